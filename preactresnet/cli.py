"""Every command-line entry point: parse the flags, run, and turn user mistakes into one-line errors.

The root scripts (train.py, test.py, ...) and the console scripts installed with the package
(preactresnet-train, preactresnet-test, ...) both call the main_* functions here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import optimize, reporting
from .checkpoint import CheckpointError
from .config import TrainConfig, parse_args
from .data import DataError
from .distributed import cleanup, is_launched
from .fileio import fail, os_error_line
from .hub import BUNDLED, export, measure_exported, push_to_hub, record_accuracy
from .inference import TTA_MODES, load_model
from .profile import PROFILE_PATH
from .system import resolve_device
from .training import NonFiniteLoss, Stopped, train

USER_ERRORS = (CheckpointError, DataError, ValueError)


def add_checkpoint_args(ap: argparse.ArgumentParser, pretrained: bool = True) -> None:
    """--checkpoint, --pretrained and --checkpoint-dir, as every evaluating command spells them."""
    ap.add_argument("--checkpoint", help="a .safetensors file, a run folder or run name (default: the newest run's best)")
    if pretrained:
        ap.add_argument("--pretrained", nargs="?", const=BUNDLED, metavar="PATH_OR_REPO_ID",
                        help="a pretrained folder or Hugging Face Hub repo id (instead of --checkpoint); bare: the weights bundled with the package")
    ap.add_argument("--checkpoint-dir", default="checkpoints", help="where run folders are looked up (default: checkpoints)")


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    """Settings test.py and test_with_checkpoints.py share."""
    ap.add_argument("--download", action=argparse.BooleanOptionalAction, default=True, help="download the test data if missing")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--amp", default="auto", help="auto, bf16, fp16 or off")
    ap.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    ap.add_argument("--fig-dir", default="fig", help="where figures go")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse's own one-line error otherwise)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def run_or_fail(parser, argv: list[str] | None, run):
    """Parse `argv` with `parser()`, then `run(args)`; a user's mistake ends in one line on stderr."""
    args = parser().parse_args(argv)
    try:
        return args, run(args)
    except USER_ERRORS as err:
        fail(str(err))
    except OSError as err:  # a path the system refused (--out or --fig-dir a file, no permission): which, in one line
        fail(os_error_line(err))


# -- train.py, export.py -------------------------------------------------------------------------------
def main_train(argv: list[str] | None = None) -> None:
    try:
        cfg, explicit = parse_args(argv)
        args = sys.argv[1:] if argv is None else argv
        train(cfg, explicit, command=" ".join(["python train.py", *args]))
    except USER_ERRORS as err:
        fail(str(err))
    except OSError as err:  # a path the system refused: which, in one line
        fail(os_error_line(err))
    except NonFiniteLoss as err:
        fail(str(err), code=3)
    except Stopped as err:  # SIGTERM or Ctrl-C: the state is saved; 143 or 130 (128 + the signal)
        leave_stopped(err.code)
    except KeyboardInterrupt:
        raise SystemExit(130)
    finally:
        cleanup()


def leave_stopped(code: int) -> None:
    """A stopped run's exit, its state saved and its logs closed. Under torchrun the process leaves without the
    interpreter's teardown: with torch 2.5.1 under load a stopped worker outlived the launcher's 30 s grace
    there (its Python code done) and was killed (tests/test_distributed.py's SIGTERM test)."""
    launched = is_launched()
    cleanup()
    if launched:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Turn a training checkpoint into a pretrained folder (model.safetensors, config.json, README.md).")
    add_checkpoint_args(ap)
    ap.add_argument("--out", help="the folder to write (default: pretrained/<run>)")
    ap.add_argument("--half", action="store_true", help="store the weights in fp16 (half the size; check the accuracy with --data-dir)")
    ap.add_argument("--data-dir", help="measure the exported weights on this data's test split and on the bundled sample, and record both")
    ap.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload it to this Hugging Face Hub repo (log in first)")
    ap.add_argument("--private", action="store_true", help="make the Hub repo private")
    return ap


def main_export(argv: list[str] | None = None) -> None:
    run_or_fail(export_parser, argv, _export)


def _export(args: argparse.Namespace) -> None:
    path = reporting.weights_path(args)
    out = export(path, args.out or Path("pretrained") / path.parent.name, half=args.half)
    print(f"exported {path} -> {out}/ (model.safetensors, config.json, README.md{', fp16 weights' if args.half else ''})")
    if args.data_dir:
        measured = measure_exported(out, args.data_dir)
        record_accuracy(out, **measured)
        sample = f", {measured['sample_accuracy']:.2f}% on the bundled sample" if "sample_accuracy" in measured else ""
        print(f"measured on the exported weights: {measured['test_accuracy']:.2f}% on {measured['data_description']}{sample} (recorded in its metadata)")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")


# -- test.py -------------------------------------------------------------------------------------------
def test_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate a checkpoint on the test set: accuracy, loss, per-class accuracy, confusion matrix.")
    add_checkpoint_args(ap)
    ap.add_argument("--data-dir", help="test data (default: the data the checkpoint was trained on)")
    ap.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation; the plain figure is always printed too")
    ap.add_argument("--ema", action="store_true", help="use the run's EMA weights (ema.safetensors)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    add_eval_args(ap)
    ap.add_argument("--no-figures", action="store_true", help="skip the confusion matrix, reliability and prediction figures")
    return ap


def main_test(argv: list[str] | None = None) -> None:
    args, report = run_or_fail(test_parser, argv, reporting.run_test)
    if args.json:
        print(json.dumps(report))
    else:
        reporting.print_test_report(report)


# -- test_with_checkpoints.py ----------------------------------------------------------------------------
def checkpoints_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Evaluate every checkpoint given (files, run folders, or all of checkpoints/) and tabulate them.")
    ap.add_argument("paths", nargs="*", help="checkpoint files or run folders (default: every run under --checkpoint-dir)")
    ap.add_argument("--checkpoint-dir", default="checkpoints", help="where run folders are looked up (default: checkpoints)")
    ap.add_argument("--log-dir", default="runs", help="where the runs' metrics.csv files are, for the per-epoch curves")
    ap.add_argument("--data-dir", help="test data (default: each checkpoint's own)")
    ap.add_argument("--sort", choices=("accuracy", "epoch", "name", "loss"), default="accuracy", help="row order")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_eval_args(ap)
    return ap


def main_checkpoints(argv: list[str] | None = None) -> None:
    args, (rows, figure) = run_or_fail(checkpoints_parser, argv, _checkpoints)
    if args.json:
        print(json.dumps({"checkpoints": rows, "figure": str(figure) if figure else None}))
    else:
        reporting.print_checkpoints_table(rows, figure)
    if all(r["error"] is not None for r in rows):
        raise SystemExit(1)


def _checkpoints(args: argparse.Namespace) -> tuple[list[dict], Path | None]:
    rows = reporting.run_checkpoints(args)
    return rows, reporting.checkpoints_figure(rows, args.fig_dir, args.log_dir)


# -- predict.py ----------------------------------------------------------------------------------------
def predict_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Classify images (files or folders, any size or mode) with a trained checkpoint.")
    ap.add_argument("images", nargs="+", help="image files or folders of images")
    add_checkpoint_args(ap)
    ap.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image (at most the class count)")
    ap.add_argument("--tta", choices=TTA_MODES, default="none", help="test-time augmentation")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a line per image")
    return ap


def main_predict(argv: list[str] | None = None) -> None:
    args, (files, lm) = run_or_fail(predict_parser, argv, lambda a: (reporting.image_files(a.images),
                                                                     load_model(reporting.weights_path(a), resolve_device(a.device))))
    device = next(lm.model.parameters()).device
    results, failed = reporting.predict_images(lm, files, device, args.tta, args.top_k, show=not args.json)
    if args.json:
        print(json.dumps({"checkpoint": str(lm.path), "predictions": results}))
    if failed:
        raise SystemExit(1)


# -- optimize_system.py ----------------------------------------------------------------------------------
def optimize_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Report this machine, time training steps per setting, and save the fastest as the profile train.py uses.")
    ap.add_argument("--model", default="preactresnet18", help="the model to time")
    ap.add_argument("--batch-size", type=int, default=256, help="the batch size to time")
    ap.add_argument("--width-mult", type=float, default=None, help="measure a narrower net (default: full, or 0.25 on CPU with --quick)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--optimizer", default=TrainConfig.optimizer, choices=["adagrad", "sgd", "adamw", "muon"],
                    help="the optimizer the timed steps use, built as train.py builds it (default: train.py's)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and settings: under a minute")
    ap.add_argument("--profile", default=str(PROFILE_PATH), help="where to write the profile")
    ap.add_argument("--no-priority", action="store_true", help="do not try to raise the process priority")
    ap.add_argument("--data-dir", default="data", help="data folder whose disk the report checks")
    ap.add_argument("--checkpoint-dir", default="checkpoints", help="checkpoint folder whose disk the report checks")
    return ap


def main_optimize(argv: list[str] | None = None) -> None:
    run_or_fail(optimize_parser, argv, optimize.run)
