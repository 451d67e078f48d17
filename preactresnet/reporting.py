"""The work behind test.py, test_with_checkpoints.py and predict.py: evaluate checkpoints, tabulate them,
classify images, and print the reports (cli.py parses the flags and calls these)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from . import plots
from .checkpoint import CheckpointError
from .data import BatchAugment, DataError, load_dataset
from .data.sources import SAMPLE_NAME
from .data.trees import IMAGE_EXTENSIONS, to_rgb
from .hub import CONFIG_NAME, WEIGHTS_NAME, bundled_folder, is_bundled, resolve_pretrained
from .inference import (
    LoadedModel,
    calibration,
    ema_checked,
    eval_loader,
    load_model,
    metrics_from_probs,
    newest_run_weights,
    predict_probs,
    resolve_checkpoint,
    tta_views,
)
from .system import resolve_amp, resolve_device, tune_malloc


def weights_path(args: argparse.Namespace, ema: bool = False) -> Path:
    """--pretrained, else --checkpoint, else the newest run's; with nothing trained yet, the bundled weights."""
    if args.pretrained:
        if args.checkpoint:
            raise CheckpointError("pass --checkpoint or --pretrained, not both")
        path = resolve_pretrained(args.pretrained) / WEIGHTS_NAME
        return ema_checked(path) if ema else path
    if args.checkpoint is None and not ema:
        found = newest_run_weights(args.checkpoint_dir)
        if found is None:
            print(f"nothing trained under {args.checkpoint_dir}/ yet: using the bundled weights, {bundled_summary()} "
                  "(pass --checkpoint for your own)", file=sys.stderr)
        return found or bundled_folder() / WEIGHTS_NAME
    return resolve_checkpoint(args.checkpoint, args.checkpoint_dir, ema)


def bundled_summary() -> str:
    """One phrase naming the bundled model and its measured accuracy."""
    config = json.loads((bundled_folder() / CONFIG_NAME).read_text())
    width = config["model_args"].get("width_mult", 1.0)
    return f"{config['model']} x{width:g}, {config['test_accuracy']:.2f}% on the CIFAR-10 test set"


class _DataCache:
    """Each (dataset, data dir) is loaded once, however many checkpoints use it."""

    def __init__(self, override: str | None, download: bool):
        self.override, self.download, self._cache = override, download, {}

    def get(self, lm: LoadedModel):
        own = SAMPLE_NAME if is_bundled(lm.path) else lm.meta.get("data_dir")  # the shipped weights: the bundled sample
        key = (lm.meta.get("dataset", "cifar10"), self.override or own or "data")
        if key not in self._cache:
            self._cache[key] = load_dataset(key[0], key[1], download=self.download)
        ds = self._cache[key]
        if ds.classes != lm.classes:
            raise CheckpointError(
                f"{lm.path} was trained on classes {lm.classes[:3]}..., but {key[1]} has {ds.classes[:3]}...; "
                "pass --data-dir with the data it was trained on"
            )
        return ds, key[1]


def _confusion_text(confusion: torch.Tensor, classes: list[str]) -> str:
    short = [c[:5] for c in classes]
    width = max(5, len(str(int(confusion.max()))))
    head = " " * 12 + " ".join(f"{s:>{width}}" for s in short)
    rows = [f"  {c[:10]:<10}" + " ".join(f"{int(v):>{width}}" for v in row) for c, row in zip(classes, confusion)]
    return "\n".join([head, *rows])


def run_test(args: argparse.Namespace) -> dict:
    tune_malloc()
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    lm = load_model(weights_path(args, ema=args.ema), device)
    if is_bundled(lm.path) and not args.data_dir:
        print("evaluating the bundled weights on the bundled 2,000-image sample (--data-dir DIR for the full test set)", file=sys.stderr)
    ds, data_dir = _DataCache(args.data_dir, args.download).get(lm)
    loader = eval_loader(lm, ds.test_images, ds.test_labels, device, args.batch_size, amp_dtype)
    probs, labels = predict_probs(lm.model, loader, "none", amp_dtype)
    plain = metrics_from_probs(probs, labels, len(lm.classes))
    tta = None
    if args.tta != "none":
        tta_probs, _ = predict_probs(lm.model, loader, args.tta, amp_dtype)
        tta = metrics_from_probs(tta_probs, labels, len(lm.classes))
    ece, table = calibration(probs, labels)
    report = {
        "checkpoint": str(lm.path),
        "model": lm.meta["model"],
        "epoch": lm.meta.get("epoch"),
        "run": lm.meta.get("run"),
        "data": f"{ds.name} test split, {len(labels)} images from {data_dir}",
        "accuracy": round(plain.accuracy, 4),
        "correct": plain.correct,
        "total": plain.total,
        "loss": round(plain.loss, 6),
        "per_class": {c: round(a, 4) for c, a in zip(lm.classes, plain.per_class)},
        "confusion": plain.confusion.tolist(),
        "ece": round(ece, 4),
        "tta": args.tta,
        "tta_accuracy": round(tta.accuracy, 4) if tta else None,
        "tta_loss": round(tta.loss, 6) if tta else None,
        "classes": lm.classes,
        "figures": [],
    }
    if not args.no_figures:
        report["figures"] = _test_figures(lm, ds, probs, labels, plain, ece, table, Path(args.fig_dir))
    return report


def _test_figures(lm, ds, probs, labels, result, ece, table, fig_root: Path) -> list[str]:
    out = fig_root / (lm.meta.get("run") or lm.path.parent.name)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *lm.classes])
        for c, row in zip(lm.classes, result.confusion.tolist()):
            w.writerow([c, *row])
    preds = probs.argmax(dim=1)
    # A fixed, class-balanced pick of test images, so the grid is comparable between checkpoints.
    pick = torch.cat([(labels == c).nonzero().flatten()[:4] for c in range(len(lm.classes))])[:32]
    paths = [
        plots.confusion_matrix(result.confusion, lm.classes, out / "confusion_matrix.png",
                               title=f"{lm.meta['model']}: confusion matrix, {result.accuracy:.2f}% test accuracy"),
        plots.per_class_bars(result.per_class, lm.classes, out / "per_class_accuracy.png", result.accuracy,
                             title=f"{lm.meta['model']}: per-class test accuracy"),
        plots.prediction_grid(ds.test_images[pick], labels[pick], preds[pick], lm.classes, out / "test_predictions.png"),
        plots.reliability_diagram(table, ece, out / "reliability.png"),
        out / "confusion_matrix.csv",
    ]
    return [str(p) for p in paths]


def print_test_report(r: dict) -> None:
    print(f"checkpoint: {r['checkpoint']} ({r['model']}, epoch {r['epoch']}, run {r['run']})")
    print(f"data: {r['data']}")
    print(f"test accuracy: {r['accuracy']:.2f}% ({r['correct']}/{r['total']})   test loss: {r['loss']:.4f}")
    if r["tta_accuracy"] is not None:
        print(f"with TTA ({r['tta']}): {r['tta_accuracy']:.2f}%   test loss: {r['tta_loss']:.4f}   (without TTA: {r['accuracy']:.2f}%)")
    print(f"expected calibration error: {r['ece']:.2f}%")
    width = max(len(c) for c in r["classes"])
    print("per-class accuracy:")
    for c, a in r["per_class"].items():
        print(f"  {c:<{width}}  {a:6.2f}%")
    print("confusion matrix (rows: true class, columns: predicted):")
    print(_confusion_text(torch.tensor(r["confusion"]), r["classes"]))
    if r["figures"]:
        print("figures: " + ", ".join(r["figures"]))


def collect_checkpoints(paths: list[str], checkpoint_dir: str) -> list[Path]:
    """The weights files to evaluate; hidden names (a killed write's temporaries) are never matched."""
    where = ", ".join(paths) or f"{checkpoint_dir}/"
    if not paths:
        root = Path(checkpoint_dir)
        if not root.is_dir():
            raise CheckpointError(f"no {root}/ folder; train first (make demo) or pass checkpoint paths")
        paths = [str(p) for p in sorted(root.iterdir()) if p.is_dir()]
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("."))
        else:
            files.append(p)  # missing or unreadable files get an error row of their own
    if not files:
        raise CheckpointError(f"no .safetensors checkpoints found in {where}; train first (make demo) or pass checkpoint paths")
    return files


def run_checkpoints(args: argparse.Namespace) -> list[dict]:
    tune_malloc()
    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    data = _DataCache(args.data_dir, args.download)
    rows = []
    for path in collect_checkpoints(args.paths, args.checkpoint_dir):
        row = {"checkpoint": str(path), "model": "?", "run": path.parent.name, "epoch": None, "data": None,
               "accuracy": None, "loss": None, "error": None}
        try:
            lm = load_model(path, device)
            row.update(model=lm.meta["model"], run=lm.meta.get("run", path.parent.name), epoch=lm.meta.get("epoch"))
            ds, data_dir = data.get(lm)
            row["data"] = f"{data_dir} ({len(ds.test_labels)} images)"  # rows on different test data must say so
            loader = eval_loader(lm, ds.test_images, ds.test_labels, device, args.batch_size, amp_dtype)
            result = metrics_from_probs(*predict_probs(lm.model, loader, "none", amp_dtype), len(lm.classes))
            row.update(accuracy=round(result.accuracy, 4), loss=round(result.loss, 6))
        except (CheckpointError, DataError, ValueError) as err:
            row["error"] = str(err)
        rows.append(row)
    key = {
        "accuracy": lambda r: -(r["accuracy"] if r["accuracy"] is not None else -1),
        "loss": lambda r: r["loss"] if r["loss"] is not None else float("inf"),
        "epoch": lambda r: (r["run"], r["epoch"] if r["epoch"] is not None else -1),
        "name": lambda r: r["checkpoint"],
    }[args.sort]
    return sorted(rows, key=key)


def run_curves(log_dir: Path, runs: set[str]) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for run in runs:
        f = log_dir / run / "metrics.csv"
        if f.is_file():
            with open(f) as fh:
                curves[run] = [(int(r["epoch"]), float(r["test_acc"])) for r in csv.DictReader(fh) if r["test_acc"]]
    return curves


def load_image(path: Path) -> torch.Tensor:
    """Any image -> uint8 3 x 32 x 32: RGB, shorter side resized to 32 (antialiased), centre crop."""
    with Image.open(path) as img:
        img = to_rgb(ImageOps.exif_transpose(img))
        img = ImageOps.fit(img, (32, 32), method=Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def image_files(specs: list[str]) -> list[Path]:
    files = []
    for s in map(Path, specs):
        if s.is_dir():
            files += sorted(p for p in s.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            files.append(s)
    if not files:
        raise ValueError(f"no images in {', '.join(specs)} (looked for {' '.join(IMAGE_EXTENSIONS)}); pass image files or a folder of them")
    return files




def checkpoints_figure(rows: list[dict], fig_dir: str | Path, log_dir: str | Path) -> Path | None:
    """Accuracy by epoch of every run in the table (with each run's metrics.csv curve where there is one)."""
    runs: dict[str, list] = {}
    for r in rows:
        if r["error"] is None and r["epoch"] is not None:
            runs.setdefault(r["run"], []).append((r["epoch"], r["accuracy"]))
    if not runs:
        return None
    return plots.accuracy_by_epoch(runs, Path(fig_dir) / "checkpoints_accuracy.png", run_curves(Path(log_dir), set(runs)))


def print_checkpoints_table(rows: list[dict], figure: Path | None) -> None:
    width = max(len(r["checkpoint"]) for r in rows)
    data_width = max([len("test data")] + [len(r["data"]) for r in rows if r["data"]])
    print(f"{'checkpoint':<{width}}  {'model':<17} {'epoch':>5}  {'test data':<{data_width}}  {'accuracy':>8}  {'loss':>7}")
    for r in rows:
        if r["error"]:
            print(f"{r['checkpoint']:<{width}}  error: {r['error']}")
        else:
            print(f"{r['checkpoint']:<{width}}  {r['model']:<17} {r['epoch'] if r['epoch'] is not None else '-':>5}  "
                  f"{r['data']:<{data_width}}  {r['accuracy']:7.2f}%  {r['loss']:7.4f}")
    if figure:
        print(f"figure: {figure}")


def predict_images(lm: LoadedModel, files: list[Path], device, tta: str, top_k: int, show: bool) -> tuple[list[dict], int]:
    """Top-k classes of every image; unreadable files are reported on stderr and counted, not fatal."""
    tf = BatchAugment(None, lm.mean, lm.std, channels_last=True)  # the model's memory format (load_model)
    k = max(1, min(top_k, len(lm.classes)))
    results, failed = [], 0
    for path in files:
        try:
            x = load_image(path)
        except Exception as err:  # unreadable, missing, not an image: report it and go on
            failed += 1
            print(f"error: cannot read {path} ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        with torch.no_grad():
            views = tta_views(tf(x[None]).to(device), tta, lm.mean, lm.std)
            probs = sum(lm.model(v).float().softmax(dim=1) for v in views)[0] / len(views)
        top = probs.topk(k)
        preds = [{"class": lm.classes[int(i)], "probability": round(float(p), 4)} for p, i in zip(top.values, top.indices)]
        results.append({"image": str(path), "top": preds})
        if show:
            print(f"{path}: " + ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in preds))
    return results, failed
