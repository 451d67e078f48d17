"""Entry points behind the root scripts: parse, run, and turn user mistakes into one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main_train(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointError
    from .config import parse_args
    from .data import DataError
    from .distributed import cleanup
    from .training import NonFiniteLoss, train

    try:
        cfg, explicit = parse_args(argv)
        args = sys.argv[1:] if argv is None else argv
        train(cfg, explicit, command=" ".join(["python train.py", *args]))
    except (ValueError, DataError, CheckpointError) as err:
        _fail(str(err))
    except NonFiniteLoss as err:
        _fail(str(err), code=3)
    except KeyboardInterrupt:
        raise SystemExit(130)
    finally:
        cleanup()


def main_export(argv: list[str] | None = None) -> None:
    import argparse

    from .checkpoint import CheckpointError
    from .hub import export, push_to_hub
    from .inference import resolve_checkpoint

    ap = argparse.ArgumentParser(description="Turn a training checkpoint into a pretrained folder (model.safetensors, config.json, README.md).")
    ap.add_argument("--checkpoint", help="a .safetensors file, a run folder or run name (default: the newest run's best)")
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--out", help="the folder to write (default: pretrained/<run>)")
    ap.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload it to this Hugging Face Hub repo (log in first)")
    ap.add_argument("--private", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = resolve_checkpoint(args.checkpoint, args.checkpoint_dir)
        out = export(path, args.out or Path("pretrained") / path.parent.name)
        print(f"exported {path} -> {out}/ (model.safetensors, config.json, README.md)")
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    except (CheckpointError, ValueError) as err:
        _fail(str(err))
