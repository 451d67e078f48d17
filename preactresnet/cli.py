"""Entry points behind the root scripts: parse, run, and turn user mistakes into one-line errors."""

from __future__ import annotations

import sys


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main_train(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointError
    from .config import parse_args
    from .data import DataError
    from .training import NonFiniteLoss, train

    try:
        cfg, explicit = parse_args(argv)
        train(cfg, explicit)
    except (ValueError, DataError, CheckpointError) as err:
        _fail(str(err))
    except NonFiniteLoss as err:
        _fail(str(err), code=3)
    except KeyboardInterrupt:
        raise SystemExit(130)
