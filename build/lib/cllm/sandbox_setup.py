"""Stage two of cllm.sandbox, run by path as root of fresh namespaces that `unshare` made (mount,
PID, network, IPC, UTS; a user namespace too when cllm is not root). Nothing untrusted has run yet.

It builds a new root of the host's system directories and the interpreter, read-only, a
private size-limited /tmp (the only writable place) and a /proc that shows only the sandbox's
processes, chroots into it, drops every privilege (unprivileged
uid/gid where the host uid is ours to give, no capabilities, no_new_privs) and execs the
command it was given. Standard library only: it runs under `python -I`.

    python -I sandbox_setup.py NEW_ROOT WORK_MB -- COMMAND...
"""

from __future__ import annotations

import ctypes
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS, PR_CAP_AMBIENT = 24, 38, 28, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECBIT_NOROOT_AND_LOCKS = 0x3F  # noroot, no_setuid_fixup, keep_caps_locked, each with its lock
NOBODY = 65534
# The whole view: the operating system's read-only system directories, the interpreter, a few
# device nodes, a private /proc and a writable /tmp; data, homes, /run, /var and the rest of the
# host are simply absent (a read-only mount would not stop connecting to a Unix socket there).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")
# statvfs flags that a read-only bind remount must keep (the kernel refuses to clear locked ones)
KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC}

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data)), f"mount {target}")


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _submounts(root: str) -> list[str]:
    """Mount points at or below `root`, parents first (mountinfo escapes spaces as octal)."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root + "/"):
                points.append(point)
    return sorted(set(points), key=len)


def _make_read_only(point: str, extra: int = MS_NOSUID) -> None:
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | extra
    try:
        kept = os.statvfs(point).f_flag
    except OSError:
        return  # a mount point that vanished or cannot be looked at is not reachable either
    for statvfs_flag, mount_flag in KEPT_FLAGS.items():
        if kept & statvfs_flag:
            flags |= mount_flag
    _mount(None, point, None, flags)


def _interpreter_paths() -> list[str]:
    """Where the interpreter and its standard library live (pyenv and conda put them in a home)."""
    return sorted({os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))})


def _expose(root: str, path: str) -> None:
    """Make host `path` visible read-only at the same place under `root`."""
    if not os.path.lexists(path) or os.path.lexists(root + path):
        return
    if os.path.islink(path):  # merged /usr: /bin -> usr/bin and the like
        os.symlink(os.readlink(path), root + path)
        return
    os.makedirs(root + path)
    _mount(path, root + path, None, MS_BIND | MS_REC)
    for point in _submounts(root + path):
        _make_read_only(point)


def _covered(path: str, exposed: list[str]) -> bool:
    return any(path == e or path.startswith(e + "/") for e in exposed)


def build_root(root: str, work_mb: int) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
    exposed = [d for d in SYSTEM_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    for directory in SYSTEM_DIRS:
        _expose(root, directory)
    for path in _interpreter_paths():
        if not _covered(path, exposed):
            _expose(root, path)
    os.mkdir(f"{root}/dev")
    for device in DEVICES:
        if os.path.exists(f"/dev/{device}"):
            open(f"{root}/dev/{device}", "w").close()
            _mount(f"/dev/{device}", f"{root}/dev/{device}", None, MS_BIND)
    os.mkdir(f"{root}/proc")
    _mount("proc", f"{root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(f"{root}/tmp")
    _mount("tmpfs", f"{root}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={work_mb}m,nr_inodes=4096,mode=1777")
    _make_read_only(root, MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/tmp")


def _prctl(option: int, value: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), what)


def drop_privileges() -> None:
    """No way back to any privilege: the host's root becomes nobody; a user namespace's root keeps
    uid 0 there (nobody is not mapped) but loses every capability, now and across exec."""
    if not _owns_all_uids():
        _prctl(PR_SET_SECUREBITS, SECBIT_NOROOT_AND_LOCKS, "lock out root's capabilities")
    for capability in range(64):  # needs CAP_SETPCAP, so before the uid changes
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(capability), 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _check(1, f"drop capability {capability}")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    if _owns_all_uids():
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # clears the remaining capabilities as well
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")


def _owns_all_uids() -> bool:
    with open("/proc/self/uid_map") as uid_map:
        return uid_map.read().split() == ["0", "0", "4294967295"]


def main(argv: list[str]) -> int:
    root, work_mb, separator, *command = argv
    if separator != "--" or not command:
        print("usage: sandbox_setup.py NEW_ROOT WORK_MB -- COMMAND...", file=sys.stderr)
        return 2
    try:
        build_root(root, int(work_mb))
        drop_privileges()
    except (SetupError, OSError) as error:
        print(f"cllm sandbox setup failed: {error}", file=sys.stderr)
        return 125
    os.execv(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
