"""Hostile generated code must be contained by cllm.sandbox (HumanEval execution)."""

import os
import socket
import threading
import time

import pytest

from cllm import sandbox
from cllm.sandbox import Limits, run_untrusted

FAST = Limits(seconds=3, memory_mb=512)


@pytest.fixture(autouse=True, params=["namespaces", "guard-only"])
def isolation(request, monkeypatch):
    """Every test runs with the kernel namespaces (where available) and without them."""
    if request.param == "guard-only":
        monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    return request.param


def test_correct_and_wrong_programs():
    assert run_untrusted("def f(x):\n    return x + 1\nassert f(1) == 2\n", FAST).status == "passed"
    failed = run_untrusted("assert 1 == 2, 'wrong answer'\n", FAST)
    assert failed.status == "failed" and "wrong answer" in failed.detail


def test_infinite_loop_is_killed_at_the_time_limit():
    start = time.monotonic()
    result = run_untrusted("while True:\n    pass\n", FAST)
    assert result.status == "timeout"
    assert time.monotonic() - start < FAST.seconds + 5


def test_fork_bomb_is_contained():
    program = "import os\nwhile True:\n    os.fork()\n"
    before = _process_count()
    result = run_untrusted(program, FAST)
    assert not result.passed
    time.sleep(0.5)
    assert _process_count() <= before + 1  # nothing left running behind
    bomb_via_subprocess = "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    assert not run_untrusted(bomb_via_subprocess, FAST).passed
    time.sleep(0.5)
    assert _process_count() <= before + 1


def test_files_outside_the_sandbox_survive(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    attempts = [
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.unlink({str(victim)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"open({str(victim)!r}, 'w').write('gone')\n",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()\n",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('gone')\n",
        f"import os\nos.system('rm -rf {tmp_path}')\n",
    ]
    for program in attempts:
        assert not run_untrusted(program, FAST).passed, program
        assert victim.read_text() == "keep me", program


def test_sandbox_directory_is_removed_afterwards(tmp_path):
    result = run_untrusted("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\nassert os.path.exists('scratch.txt')\n", FAST)
    assert result.passed
    leftovers = [p for p in os.listdir("/tmp") if p.startswith("cllm-sandbox-")]
    assert leftovers == []


def test_no_network_access():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(6)
    port = server.getsockname()[1]
    connections = []
    thread = threading.Thread(target=lambda: _accept(server, connections))
    thread.start()
    programs = [
        f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n",
        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\n",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
    ]
    for program in programs:
        assert not run_untrusted(program, FAST).passed, program
    thread.join()
    server.close()
    assert connections == []


def test_memory_bomb_fails_instead_of_exhausting_the_machine():
    result = run_untrusted("x = bytearray(8 * 1024 ** 3)\n", FAST)
    assert result.status == "failed" and "MemoryError" in result.detail


def _accept(server, connections):
    try:
        connections.append(server.accept())
    except (TimeoutError, OSError):
        pass


def _process_count() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())
