"""Inputs and outputs on disk: every bad path is one clear CllmError, and no output is half-written.

Outputs are checked before any work starts (a run that would fail at its last write after an
hour of decoding fails at once instead) and written whole or not at all.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cllm.errors import CllmError


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file the user named (`what` says which, e.g. "recipe")."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CllmError(
            f"{what} {path} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def read_bytes(path: Path, what: str) -> bytes:
    if path.is_dir():
        raise CllmError(f"{what} {path} is a directory, not a file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CllmError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CllmError(f"cannot read {what} {path}: {exc.strerror}") from None


def check_output_dir(path: Path, what: str) -> None:
    """Fail now if `path` cannot become a directory to write into. Creates nothing another process
    could see: torchrun ranks check the same --out at once, and one rank's trial mkdir + rmdir of
    the path itself raced the other's check; the probe is a uniquely named directory beside it."""
    if path.exists():
        if not path.is_dir():
            raise CllmError(f"{what} {path} is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CllmError(f"cannot write into {what} {path}: permission denied")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():  # also stops at a file standing where a directory should be
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CllmError(f"cannot create {what} {path}: {ancestor} is not a directory")
    try:  # a uniquely named probe: os.access says yes to root under /proc or on a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".cllm-probe-", dir=ancestor))
    except OSError as exc:
        raise CllmError(f"cannot create {what} {path}: {exc.strerror} in {ancestor}") from None


def check_output_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise CllmError(f"{what} {path} is a directory, not a file")
    check_output_dir(path.parent, f"the directory of {what}")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Whole or nothing: a temporary file beside `path`, then a rename. A device or pipe
    (/dev/stdout) is written in place: a rename would replace the device node itself."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if path.is_dir():
        raise CllmError(f"cannot write {path}: it is a directory")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        _write(path, payload, path)
        return
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(temporary, payload, path)
        temporary.replace(path)
    except OSError as exc:
        raise CllmError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)


def _write(path: Path, payload: bytes, shown: Path) -> None:
    try:
        with open(path, "wb") as handle:
            handle.write(payload)
            handle.flush()
            if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                os.fsync(handle.fileno())  # the rename must not land before the data
    except OSError as exc:
        raise CllmError(f"cannot write {shown}: {exc.strerror}") from None
