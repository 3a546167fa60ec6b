"""Hostile generated code must not harm the host (cllm.sandbox, docs/sandbox.md).

Every hostile program runs twice: with the Python-level guards and without them, so that the
kernel's boundary (namespaces, read-only root, unprivileged uid, no capabilities) is what is
tested. Each case checks the host afterwards: the victim files and directories are unchanged,
no process of the run survives, no listener saw a connection, no secret came back.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cllm import sandbox
from cllm.sandbox import Limits, SandboxUnavailable, run_untrusted

FAST = Limits(seconds=4, memory_mb=512)
PRECIOUS = "keep me"

pytestmark = [
    pytest.mark.skipif(sandbox.unavailable_reason() is not None,
                       reason=f"the kernel refuses the sandbox here: {sandbox.unavailable_reason()}"),
    pytest.mark.heavy,  # every test runs programs in namespaces, some until their time limit
]


@dataclass
class Host:
    """What the hostile programs aim at, all world-writable so that only the sandbox stops them."""
    hidden: Path  # a directory outside the sandbox's view (under /tmp)
    visible: Path | None  # one inside its read-only view (under /etc; only when we are root)
    token: str  # a secret in the environment, a home file and a host process's environment
    sleeper: subprocess.Popen  # a host process with the token in its environment
    home_secret: Path

    def victims(self) -> list[Path]:
        return [d for d in (self.hidden, self.visible) if d is not None]

    def assert_unharmed(self, program: str) -> None:
        for directory in self.victims():
            assert sorted(p.name for p in directory.iterdir()) == ["precious.txt"], program
            precious = directory / "precious.txt"
            assert precious.read_text() == PRECIOUS and precious.stat().st_mode & 0o777 == 0o666, program
        assert self.sleeper.poll() is None, f"a host process was killed: {program}"
        assert self.home_secret.read_text() == self.token
        assert _processes_mentioning(self.token) == [self.sleeper.pid], program


@pytest.fixture
def host():
    token = "cllm" + secrets.token_hex(8)
    hidden = Path(tempfile.mkdtemp(prefix="cllm-victim-"))
    visible = Path(tempfile.mkdtemp(prefix="cllm-victim-", dir="/etc")) if os.geteuid() == 0 else None
    home_secret = Path(pwd.getpwuid(os.getuid()).pw_dir) / f".cllm-test-secret-{secrets.token_hex(4)}"
    home_secret.write_text(token)
    for directory in filter(None, (hidden, visible)):
        directory.chmod(0o777)
        (directory / "precious.txt").write_text(PRECIOUS)
        (directory / "precious.txt").chmod(0o666)
    sleeper = subprocess.Popen(["sleep", "600"], env={"CLLM_SECRET": token, "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 5  # a loaded machine once showed the new process's /proc entry late
    while _processes_mentioning(token) != [sleeper.pid] and time.monotonic() < deadline:
        time.sleep(0.05)
    os.environ["CLLM_SECRET"] = token
    try:
        yield Host(hidden, visible, token, sleeper, home_secret)
    finally:
        del os.environ["CLLM_SECRET"]
        sleeper.kill()
        home_secret.unlink(missing_ok=True)
        for directory in filter(None, (hidden, visible)):
            shutil.rmtree(directory, ignore_errors=True)


def _processes_mentioning(token: str) -> list[int]:
    """Host processes with the token in their command line or environment."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            text = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if token.encode() in text and int(pid) != os.getpid():
            found.append(int(pid))
    return found


# Each program is formatted with: hidden, visible (the directories), victim (a precious file in
# each, as a Python list), token, home (the home secret), sleeper (its pid).
DESTRUCTIVE = {
    "posix.system": "import posix\nfor d in {dirs}:\n"
    "    posix.system(f'touch {{d}}/pwned; rm -f {{d}}/precious.txt')\n",
    "posix.fork": "import posix\nif posix.fork() == 0:\n    for d in {dirs}:\n        try:\n"
    "            open(d + '/forked', 'w')\n"
    "        except OSError:\n            pass\n    posix.execv('/bin/sleep', ['sleep', '600', '{token}'])\n",
    "posix.unlink": "import posix\nfor v in {victims}:\n    posix.unlink(v)\n",
    "io.FileIO": "import io\nfor d in {dirs}:\n    io.FileIO(d + '/new', 'w').write(b'x')\n",
    "open for writing": "for v in {victims}:\n    open(v, 'w').write('gone')\n",
    "pathlib": "import pathlib\nfor v in {victims}:\n    pathlib.Path(v).write_text('gone')\n"
    "    pathlib.Path(v).unlink()\n",
    "shutil.rmtree": "import shutil\nfor d in {dirs}:\n    shutil.rmtree(d)\n",
    "os.remove after deleting sys.modules['os']": "import sys\ndel sys.modules['os']\nimport os\nfor v in {victims}:\n"
    "    os.remove(v)\n",
    "importlib.reload(os)": "import importlib, os\nos = importlib.reload(os)\nfor v in {victims}:\n    os.remove(v)\n",
    "sys.modules posix alias": "import sys\nposix = sys.modules['posix']\nfor v in {victims}:\n"
    "    posix.rename(v, v + '.moved')\n",
    "ctypes unlink": "import ctypes\nlibc = ctypes.CDLL(None)\nfor v in {victims}:\n"
    "    assert libc.unlink(v.encode()) == 0\n",
    "ctypes system": "import ctypes\nctypes.CDLL(None).system(b'rm -r ' + ' '.join({dirs}).encode())\n",
    "ctypes remount read-write": "import ctypes\nlibc = ctypes.CDLL(None)\nfor d in {dirs}:\n"
    "    libc.mount(None, b'/', None, 0x20 | 0x1000, None)\n"
    "    libc.mount(None, d.encode(), None, 0x20 | 0x1000, None)\n    open(d + '/precious.txt', 'w').write('gone')\n",
    "ctypes unshare then write": "import ctypes\nlibc = ctypes.CDLL(None)\n"
    "assert libc.unshare(0x10000000 | 0x20000) == 0\n"
    "for v in {victims}:\n    open(v, 'w').write('gone')\n",
    "chroot escape": "import os\nos.mkdir('jail')\nos.chroot('jail')\nfor _ in range(20):\n    os.chdir('..')\n"
    "os.chroot('.')\n"
    "for v in {victims}:\n    os.remove(v)\n",
    "setuid root": "import os\nos.setuid(0)\nfor v in {victims}:\n    os.remove(v)\n",
    "symlink in /tmp": "import os\nfor i, v in enumerate({victims}):\n    os.symlink(v, f'link{{i}}')\n"
    "    open(f'link{{i}}', 'w').write('gone')\n",
    "hard link": "import os\nfor i, v in enumerate({victims}):\n    os.link(v, f'hard{{i}}')\n"
    "    open(f'hard{{i}}', 'w').write('gone')\n",
    "/proc/self/root": "for v in {victims}:\n    open('/proc/self/root' + v, 'w').write('gone')\n",
    "/proc/PID/root and /proc/PID/cwd": "import os\nfor pid in ('1', str(os.getppid()), 'self'):\n"
    "    for v in {victims}:\n        for way in ('/root' + v, '/cwd/../../../..' + v):\n            try:\n"
    "                open('/proc/' + pid + way, 'w').write('gone')\n            except OSError:\n"
    "                pass\n",
    "/proc/self/fd": "import os\nfor fd in os.listdir('/proc/self/fd'):\n    try:\n"
    "        open('/proc/self/fd/' + fd, 'a').write('x')\n    except OSError:\n        pass\n"
    "fds = [os.open(v, os.O_RDONLY) for v in {victims}]\nfor fd in fds:\n"
    "    open(f'/proc/self/fd/{{fd}}', 'w').write('gone')\n",
    "subprocess shell": "import subprocess\nfor v in {victims}:\n"
    "    subprocess.run(['sh', '-c', f'echo gone > {{v}}'], check=True)\n",
    "posix_spawn rm": "import os\nfor v in {victims}:\n"
    "    os.waitpid(os.posix_spawn('/bin/rm', ['rm', '-f', v], {{}}), 0)\nassert False\n",
    "execv sh": "import os\nos.execv('/bin/sh', ['sh', '-c', 'rm -rf ' + ' '.join({dirs})])\n",
    "chmod and chown": "import os\nfor v in {victims}:\n    os.chmod(v, 0)\n    os.chown(v, 65534, 65534)\n",
    "kill every process": "import os, signal\nos.kill({sleeper}, signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "detached process that outlives the run": "import subprocess\n"
    "subprocess.Popen(['sh', '-c', 'sleep 3; touch ' + ' '.join(d + '/late' for d in {dirs})],"
    " start_new_session=True)\nsubprocess.Popen(['sleep', '600', '{token}'], start_new_session=True)\n",
    "double fork daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
    "        os.execv('/bin/sleep', ['sleep', '600', '{token}'])\n    os._exit(0)\ntime.sleep(0.5)\n",
}

# The program passes (exit 0) only if it got the secret; it also prints it, to test that channel.
SECRETS = {
    "/etc/shadow": "import sys\ndata = open('/etc/shadow').read()\nprint(data, file=sys.stderr)\n"
    "assert 'root:' in data\n",
    "the invoking user's home": "import sys\ndata = open('{home}').read()\nprint(data, file=sys.stderr)\n"
    "assert '{token}' in data\n",
    "the environment": "import os, sys\nprint(dict(os.environ), file=sys.stderr)\n"
    "assert '{token}' in str(os.environ)\n",
    "other processes' environments": "import os, sys\nfound = []\nfor pid in os.listdir('/proc'):\n    try:\n"
    "        found.append(open(f'/proc/{{pid}}/environ', 'rb').read())\n    except Exception:\n        pass\n"
    "found.append(open('/proc/{sleeper}/environ', 'rb').read())\nfound = [e for e in found if b'{token}' in e]\n"
    "print(found, file=sys.stderr)\nassert found\n",
}


def _format(template: str, host: Host) -> str:
    dirs = [str(d) for d in host.victims()]
    return template.format(dirs=dirs, victims=[f"{d}/precious.txt" for d in dirs], token=host.token,
                           home=str(host.home_secret), sleeper=host.sleeper.pid)


@pytest.mark.parametrize("python_guard", [False, True], ids=["kernel-only", "with-python-guard"])
@pytest.mark.parametrize("name", sorted(DESTRUCTIVE))
def test_destructive_program_does_no_harm(name, python_guard, host):
    program = _format(DESTRUCTIVE[name], host)
    result = run_untrusted(program, FAST, python_guard=python_guard)
    if "outlives" in name:
        time.sleep(4)  # past the late writer's delay
    time.sleep(0.2)
    assert "sandbox setup failed" not in result.detail  # the program did run, in the sandbox
    host.assert_unharmed(program)


@pytest.mark.parametrize("python_guard", [False, True], ids=["kernel-only", "with-python-guard"])
@pytest.mark.parametrize("name", sorted(SECRETS))
def test_secrets_stay_secret(name, python_guard, host):
    result = run_untrusted(_format(SECRETS[name], host), FAST, python_guard=python_guard)
    shadow_line = _first_shadow_hash()
    assert host.token not in result.detail
    assert shadow_line is None or shadow_line not in result.detail
    assert not result.passed


def _first_shadow_hash() -> str | None:
    try:
        return next(line.split(":")[1] for line in open("/etc/shadow") if len(line.split(":")[1]) > 2)
    except (OSError, StopIteration, IndexError):
        return None


@pytest.mark.parametrize("python_guard", [False, True], ids=["kernel-only", "with-python-guard"])
def test_no_connection_reaches_a_host_listener(python_guard, tmp_path):
    tcp, udp, unix_socket, abstract = socket.socket(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM), \
        socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    tcp.bind(("127.0.0.1", 0))
    udp.bind(("127.0.0.1", 0))
    unix_path = str(tmp_path / "listener.sock")
    unix_socket.bind(unix_path)
    os.chmod(unix_path, 0o777)
    abstract_name = "\0cllm-test-" + secrets.token_hex(4)
    abstract.bind(abstract_name)
    seen: list = []
    stop = threading.Event()  # the listeners poll until every program has run
    listeners = [threading.Thread(target=_accept, args=(s, seen, stop)) for s in (tcp, unix_socket, abstract)]
    listeners.append(threading.Thread(target=_receive, args=(udp, seen, stop)))
    for s in (tcp, unix_socket, abstract):
        s.listen()
    for s in (tcp, udp, unix_socket, abstract):
        s.settimeout(0.2)
    for thread in listeners:
        thread.start()
    port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    programs = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
        (
            f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.sendto(b'leak', ('127.0.0.1', {udp_port}))\n"
            "s.sendto(b'leak', ('10.0.0.1', 53))\n"
        ),
        f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({unix_path!r})\n",
        f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({abstract_name!r})\n",
        "import socket\nsocket.getaddrinfo('pypi.org', 443)\n",
    ]
    for program in programs:
        assert not run_untrusted(program, FAST, python_guard=python_guard).passed, program
    stop.set()
    for thread in listeners:
        thread.join()
    for s in (tcp, udp, unix_socket, abstract):
        s.close()
    assert seen == []


def _accept(server: socket.socket, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            seen.append(server.accept())
        except TimeoutError:
            continue
        except OSError:
            return


def _receive(server: socket.socket, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            seen.append(server.recvfrom(16))
        except TimeoutError:
            continue
        except OSError:
            return


@pytest.mark.parametrize("python_guard", [False, True], ids=["kernel-only", "with-python-guard"])
def test_resource_bombs_fail_and_leave_nothing(python_guard):
    before = _process_count()
    memory = run_untrusted("x = bytearray(8 * 1024 ** 3)\n", FAST, python_guard=python_guard)
    assert memory.status == "failed" and "MemoryError" in memory.detail
    disk = run_untrusted(
        "with open('/tmp/big', 'wb') as f:\n    for _ in range(1024):\n        f.write(bytes(2**20))\n",
        FAST,
        python_guard=python_guard,
    )
    assert disk.status == "failed" and ("No space left" in disk.detail or "File too large" in disk.detail
                                        or "SIGXFSZ" in disk.detail or disk.detail == "")
    spinner = run_untrusted("import subprocess, sys\nwhile True:\n    subprocess.Popen(['sleep', '60'])\n", FAST,
                            python_guard=python_guard)
    assert not spinner.passed
    time.sleep(0.5)
    assert _process_count() <= before + 1


def _process_count() -> int:
    return sum(1 for name in os.listdir("/proc") if name.isdigit())


def test_correct_and_wrong_programs_and_the_time_limit():
    assert run_untrusted("def f(x):\n    return x + 1\nassert f(1) == 2\n", FAST).status == "passed"
    failed = run_untrusted("assert 1 == 2, 'wrong answer'\n", FAST)
    assert failed.status == "failed" and "wrong answer" in failed.detail
    start = time.monotonic()
    assert run_untrusted("while True:\n    pass\n", FAST).status == "timeout"
    assert time.monotonic() - start < FAST.seconds + 5
    scratch = ("import os\nopen('scratch.txt', 'w').write('x')\n"
               "assert os.getcwd() == '/tmp' and os.path.exists('scratch.txt')\n")
    assert run_untrusted(scratch, FAST).passed
    assert [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("cllm-sandbox-")] == []


def test_user_namespace_route_drops_every_capability(monkeypatch):
    """What a non-root user gets: root of a user namespace, with no capability to undo the mounts."""
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    probe = ("import os\nstatus = open('/proc/self/status').read()\n"
             "assert 'CapEff:\\t0000000000000000' in status and 'NoNewPrivs:\\t1' in status, status\n"
             "assert not {'home', 'run', 'var', 'srv', 'opt', 'mnt'} & set(os.listdir('/'))\n")
    assert sandbox._run(probe, FAST, isolate=True, python_guard=False).passed
    remount = "import ctypes\nassert ctypes.CDLL(None).umount2(b'/tmp', 2) == 0\n"
    assert not sandbox._run(remount, FAST, isolate=True, python_guard=False).passed


def test_without_the_kernel_sandbox_nothing_runs_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "namespaces are disabled")
    with pytest.raises(SandboxUnavailable, match="--unsafe-exec"):
        run_untrusted("print('hi')\n", FAST)
    assert run_untrusted("assert 1 + 1 == 2\n", FAST, unsafe=True).passed
    assert run_untrusted("while True:\n    pass\n", FAST, unsafe=True).status == "timeout"


def test_sleeper_is_a_real_host_process(host):
    """Guards the harm checks: the token is visible where the checks look for it."""
    assert _processes_mentioning(host.token) == [host.sleeper.pid]
    assert host.sleeper.poll() is None
    os.kill(host.sleeper.pid, 0)
