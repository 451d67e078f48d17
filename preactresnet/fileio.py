"""Writing files so that a kill never leaves half of one, and turning errors into one line."""

from __future__ import annotations

import functools
import glob
import os
import socket
import sys
from pathlib import Path


def temp_name(path: Path, pid: int | None = None) -> Path:
    """A hidden sibling with the same suffix (writers such as matplotlib read the format from it):
    `.last.tmp.host-1234.safetensors`, named by machine and process (a shared folder serves several
    machines, whose process ids mean nothing here). Globs that list checkpoints skip hidden names."""
    return path.with_name(f".{path.stem}.tmp.{socket.gethostname()}-{os.getpid() if pid is None else pid}{path.suffix}")


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp) on a temporary file beside `path`, fsync it, move it into place, fsync the folder.

    A crash, kill or power loss at any moment leaves either the old file or the new one, never half of
    either. Temporaries a killed write left behind for this name are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.stem)}.tmp.*{glob.escape(path.suffix)}"):
        host, _, pid = stale.name.removeprefix(f".{path.stem}.tmp.").removesuffix(path.suffix).rpartition("-")
        if host in ("", socket.gethostname()) and not _alive(pid):  # another machine's may be a live write
            stale.unlink(missing_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, _new_file_mode())  # safetensors creates its files owner-only (0600): others' reads would fail
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.cache
def _new_file_mode() -> int:
    """The mode open() gives a new file here: 0o666 less the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _alive(pid: str) -> bool:
    """Whether process `pid` still runs (its temporary may be a write in progress)."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; folders cannot be opened on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_line(err: BaseException | str, default: str | None = None) -> str:
    """The first line of an exception's message (or `default`, else the exception's type name)."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return default if default is not None else type(err).__name__


def os_error_line(err: OSError) -> str:
    """One line for a path the system refused (a file where a folder must go, no permission, a full disk)."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    if not where:
        return first_line(err)
    hint = {FileExistsError: "a file stands where a folder is needed", NotADirectoryError: "a file stands where a folder is needed",
            IsADirectoryError: "a folder stands where a file is needed"}.get(type(err), err.strerror or type(err).__name__)
    return f"cannot use {where}: {hint}; pass another path or fix that one"


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and exit: what every command does with a user's mistake."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
