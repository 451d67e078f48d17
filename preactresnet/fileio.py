"""Writing files so that a kill never leaves half of one, and turning errors into one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then move it into place in one step.

    A crash or kill at any moment leaves either the old file or the new one, never half of either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def first_line(err: BaseException | str, default: str | None = None) -> str:
    """The first line of an exception's message (or `default`, else the exception's type name)."""
    text = str(err).strip()
    if text:
        return text.splitlines()[0]
    return default if default is not None else type(err).__name__


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr and exit: what every command does with a user's mistake."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
