"""Ablation of the time-to-accuracy techniques: train.py with each one on and off, same seeds, one table.

    python bench/recipe.py --config configs/cpu_10epochs.yaml --data-dir ../shared/data/cifar10-jpeg.tar.gz \
        --seeds 0 1 --rows recipe,-alt-flip,-whiten,-ema,-linear --out bench/results/cpu10.jsonl

Each row is the --config recipe plus that row's flags (ROWS below); "recipe" adds none. Every run's
result is appended to --out as it ends, and runs already there are skipped, so an interrupted ablation
continues where it stopped. The table (markdown) goes to stdout: test accuracy after the last epoch
(mean of the seeds, with their spread), its difference from the "recipe" row, and training images/s.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preactresnet.system import cpu_kind  # noqa: E402


def _fixnorm(lr: str, warmup_lr: str, adamw_scale: str) -> list[str]:
    """--muon-fixed-norm at `lr`, BN/bias and classifier (AdamW) scaled back to 0.02 by `adamw_scale` = 0.02 / lr."""
    return ["--muon-fixed-norm", "--muon-adjust-lr", "original", "--lr", lr, "--warmup-lr", warmup_lr,
            "--bn-lr-scale", adamw_scale, "--head-lr-scale", adamw_scale]


# name -> (what the row changes, flags added to the recipe)
EMA_ROWS = {"+ema"}  # rows whose test_acc is the EMA weights' (the raw model's stays in raw_test_acc)
ROWS: dict[str, tuple[str, list[str]]] = {
    "recipe": ("the recipe as written", []),
    "spec-default": ("the spec's default recipe: Adagrad lr 0.05, batch 256, mixing, jitter, erasing",
                     ["--optimizer", "adagrad", "--lr", "0.05", "--batch-size", "256", "--warmup-epochs", "1",
                      "--warmup-lr", "1e-5", "--mix-prob", "0.5", "--jitter-prob", "0.8", "--erase-prob", "0.25",
                      "--label-smoothing", "0.1", "--schedule", "cosine", "--no-alt-flip", "--no-whiten-stem",
                      "--no-ema", "--bn-lr-scale", "1", "--crop-padding", "4"]),
    "old-cpu10": ("the previous cpu_10epochs recipe: SGD lr 0.1, batch 128, cosine, smoothing 0.1",
                  ["--optimizer", "sgd", "--lr", "0.1", "--batch-size", "128", "--warmup-epochs", "1",
                   "--warmup-lr", "0.01", "--label-smoothing", "0.1", "--schedule", "cosine", "--no-alt-flip",
                   "--no-whiten-stem", "--no-ema", "--bn-lr-scale", "1", "--crop-padding", "4"]),
    "old-demo": ("the previous demo recipe: SGD lr 0.1, batch 128, 4 epochs, cosine, smoothing 0.1",
                 ["--optimizer", "sgd", "--lr", "0.1", "--batch-size", "128", "--epochs", "4", "--warmup-epochs",
                  "0.5", "--warmup-lr", "0.01", "--label-smoothing", "0.1", "--schedule", "cosine",
                  "--no-alt-flip", "--no-whiten-stem", "--no-ema", "--bn-lr-scale", "1", "--crop-padding", "4"]),
    "-alt-flip": ("random flip instead of alternating", ["--no-alt-flip"]),
    "+alt-flip": ("alternating flip", ["--alt-flip"]),
    "-whiten": ("random stem init instead of patch whitening", ["--no-whiten-stem"]),
    "+whiten": ("stem initialised by patch whitening", ["--whiten-stem"]),
    "-ema": ("no EMA", ["--no-ema"]),
    "+ema": ("EMA with decay warmup (the EMA's accuracy is reported)", ["--ema", "--ema-warmup"]),
    "+lookahead": ("airbench's Lookahead: back to a slow copy every 5 steps, ending on it", ["--lookahead"]),
    "-linear": ("cosine decay instead of linear", ["--schedule", "cosine"]),
    "+linear": ("linear decay instead of cosine", ["--schedule", "linear"]),
    "-bn-lr": ("BN/bias lr scale 1", ["--bn-lr-scale", "1"]),
    "+bn-lr": ("BN/bias lr x4", ["--bn-lr-scale", "4"]),
    "ls0": ("no label smoothing", ["--label-smoothing", "0"]),
    "ls0.1": ("label smoothing 0.1", ["--label-smoothing", "0.1"]),
    "ls0.2": ("label smoothing 0.2", ["--label-smoothing", "0.2"]),
    "lr0.1": ("lr 0.1", ["--lr", "0.1"]),
    "lr0.2": ("lr 0.2", ["--lr", "0.2"]),
    "lr0.4": ("lr 0.4", ["--lr", "0.4"]),
    "bs256": ("batch 256", ["--batch-size", "256"]),
    "bs64": ("batch 64", ["--batch-size", "64"]),
    "pad2": ("crop padding 2", ["--crop-padding", "2"]),
    "pad0": ("no crop (flip only)", ["--crop-padding", "0"]),
    "zero-init": ("residual branches start at zero", ["--zero-init-residual"]),
    "wd1e-3": ("weight decay 1e-3", ["--weight-decay", "1e-3"]),
    "wd2e-4": ("weight decay 2e-4", ["--weight-decay", "2e-4"]),
    "wd5e-3": ("weight decay 5e-3 (Muon and AdamW decay by lr x wd per step)", ["--weight-decay", "5e-3"]),
    "wd1e-2": ("weight decay 1e-2", ["--weight-decay", "1e-2"]),
    "wd2e-2": ("weight decay 2e-2", ["--weight-decay", "2e-2"]),
    "pad4": ("crop padding 4", ["--crop-padding", "4"]),
    "muon": ("Muon for conv weights (AdamW for the rest), lr 0.02", ["--optimizer", "muon", "--lr", "0.02", "--warmup-lr", "0.002"]),
    "-muon": ("Nesterov SGD lr 0.1 instead of Muon", ["--optimizer", "sgd", "--lr", "0.1", "--warmup-lr", "0.01"]),
    "muon-lr0.01": ("Muon, lr 0.01", ["--optimizer", "muon", "--lr", "0.01", "--warmup-lr", "0.001"]),
    "muon-lr0.04": ("Muon, lr 0.04", ["--optimizer", "muon", "--lr", "0.04", "--warmup-lr", "0.004"]),
    "muon-lr0.03": ("Muon, lr 0.03", ["--optimizer", "muon", "--lr", "0.03", "--warmup-lr", "0.003"]),
    "polar": ("Muon's orthogonalization with timm's Polar Express coefficients, not its quintic ones",
              ["--muon-ns-coefficients", "polar_express"]),
    "warm0.25": ("warmup 0.25 epochs", ["--warmup-epochs", "0.25"]),
    "warm1": ("warmup 1 epoch", ["--warmup-epochs", "1"]),
    "head0.1": ("the classifier at a tenth of the lr (Muon: AdamW 0.002, not 0.02)", ["--head-lr-scale", "0.1"]),
    "fixnorm": ("Muon's weights held on their first norm, lr/sqrt(fan-in) a step (airbench's Muon): lr 0.05, the AdamW "
                "parts kept at 0.02", _fixnorm("0.05", "0.005", "0.4")),
    "fixnorm-lr0.025": ("fixnorm at lr 0.025 (the AdamW parts at 0.02)", _fixnorm("0.025", "0.0025", "0.8")),
    "fixnorm-lr0.015": ("fixnorm at lr 0.015 (the AdamW parts at 0.02)", _fixnorm("0.015", "0.0015", "1.3333")),
    "reflect": ("crops mirror the image at its edge instead of showing black (airbench's translate)", ["--crop-fill", "reflect"]),
    "warm0.25-reflect": ("warmup 0.25 epochs and reflect-filled crops (the two that did not lose at 3,130 steps)",
                         ["--warmup-epochs", "0.25", "--crop-fill", "reflect"]),
    "freeze-bn": ("every BN weight fixed at 1 (airbench's BatchNorm without a learned scale)", ["--freeze", "bn-scale"]),
    "b512-lr0.04": ("batch 512, Muon lr 0.04 (run at the images the 1.13x images/s of batch 512 buys: --total-steps 884)",
                    ["--batch-size", "512", "--lr", "0.04", "--warmup-lr", "0.004"]),
    "b512-lr0.06": ("batch 512, Muon lr 0.06 (--total-steps 884, as b512-lr0.04)",
                    ["--batch-size", "512", "--lr", "0.06", "--warmup-lr", "0.006"]),
    "orig-lr0.2": ("Muon's step scaled per shape by its spectral norm (--muon-adjust-lr original) at lr 0.2: the 256-channel "
                   "matrices' step as now, the narrower ones 1.5-9x theirs; AdamW parts kept at 0.02, decay lr x wd kept at 1e-3",
                   ["--muon-adjust-lr", "original", "--lr", "0.2", "--warmup-lr", "0.02", "--bn-lr-scale", "0.1",
                    "--head-lr-scale", "0.1", "--weight-decay", "5e-3"]),
    "muon-lr0.015": ("Muon lr 0.015 (the file's 0.02) at the file's decay 5e-2", ["--lr", "0.015", "--warmup-lr", "0.0015"]),
    "freeze-stem": ("the whitened stem never trains (airbench's frozen whitening)", ["--freeze", "stem"]),
    "adamuon": ("timm's AdaMuon: the orthogonalized step scaled by Adam's second moment", ["--muon-algo", "adamuon"]),
    "bs64-lr0.04": ("batch 64, Muon lr 0.04", ["--batch-size", "64", "--lr", "0.04", "--warmup-lr", "0.004"]),
    "bs64-lr0.03": ("batch 64, Muon lr 0.03", ["--batch-size", "64", "--lr", "0.03", "--warmup-lr", "0.003"]),
    "bs64-lr0.04-warm0.25": ("batch 64, Muon lr 0.04, warmup 0.25 epochs",
                             ["--batch-size", "64", "--lr", "0.04", "--warmup-lr", "0.004", "--warmup-epochs", "0.25"]),
    "erase": ("random erasing p 0.25 (cutout-like)", ["--erase-prob", "0.25"]),
    "mix": ("MixUp/CutMix on half the batches", ["--mix-prob", "0.5"]),
    "width0.375": ("width x0.375", ["--width-mult", "0.375"]),
    "width0.5": ("width x0.5", ["--width-mult", "0.5"]),
    "width0.75": ("width x0.75", ["--width-mult", "0.75"]),
    "width1.0": ("width x1.0 (the paper's PreActResNet18)", ["--width-mult", "1.0"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu_10epochs.yaml", help="the recipe every row starts from")
    ap.add_argument("--data-dir", default="sample", help="training data (train.py's --data-dir)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds; every row runs each one")
    ap.add_argument("--rows", default="recipe", help=f"comma-separated rows, from: {', '.join(ROWS)}")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to every run (last)")
    ap.add_argument("--out", default="bench/results/recipe.jsonl", help="results file (appended; runs in it are skipped)")
    ap.add_argument("--workdir", default="", help="where runs write checkpoints and logs (default: a temporary folder)")
    ap.add_argument("--table-only", action="store_true", help="print the table from --out, run nothing")
    return ap.parse_args(argv)


def run_one(args, row: str, seed: int, workdir: Path) -> dict:
    name = f"{row}-s{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--data-dir", args.data_dir,
           "--seed", str(seed), f"--run-name={name}", "--no-progress", "--tta", "flip", "--profile", "off",
           "--checkpoint-dir", str(workdir / "checkpoints"), "--log-dir", str(workdir / "runs"),
           "--fig-dir", str(workdir / "fig"), *ROWS[row][1], *args.extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: row {row} seed {seed} failed:\n{proc.stderr[-2000:]}")
    with open(workdir / "runs" / name / "metrics.csv") as f:
        history = list(csv.DictReader(f))
    tta = [line for line in proc.stdout.splitlines() if line.startswith("with flip TTA")]
    last = history[-1]
    scored = "ema_test_acc" if row in EMA_ROWS else "test_acc"  # the row that adds an EMA is scored by the EMA
    return {
        "row": row, "seed": seed, "config": args.config, "data_dir": args.data_dir, "extra": args.extra,
        "flags": ROWS[row][1], "epochs": len(history), "test_acc": float(last[scored]), "scored": scored,
        "raw_test_acc": float(last["test_acc"]),
        "ema_test_acc": float(last["ema_test_acc"]) if last.get("ema_test_acc") else None,
        "tta_acc": float(tta[0].split()[3].rstrip("%")) if tta else None,
        "by_epoch": [float(r["test_acc"]) for r in history if r["test_acc"]],  # the epochs evaluated (--eval-every)
        "images_per_sec": statistics.mean(float(r["images_per_sec"]) for r in history),
        "train_eval_seconds": float(last["elapsed_seconds"]), "wall_seconds": round(time.perf_counter() - start, 1),
        "cpu": cpu_kind(), "command": " ".join(cmd[1:]),
        "kernels_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
    }


def table(results: list[dict]) -> str:
    rows: dict[str, list[dict]] = {}
    for r in results:
        rows.setdefault(r["row"], []).append(r)
    ref = statistics.mean(r["test_acc"] for r in rows["recipe"]) if "recipe" in rows else None
    lines = ["| row | change | seeds | test acc (mean, spread) | vs recipe | flip TTA | img/s | train+eval s | in the recipe |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row, rs in rows.items():
        accs = [r["test_acc"] for r in rs]
        mean = statistics.mean(accs)
        spread = f" (±{(max(accs) - min(accs)) / 2:.2f})" if len(accs) > 1 else ""
        delta = f"{mean - ref:+.2f}" if ref is not None and row != "recipe" else ""
        tta = [r["tta_acc"] for r in rs if r["tta_acc"] is not None]
        tta_s = f"{statistics.mean(tta):.2f}%" if tta else ""
        ips = statistics.mean(r["images_per_sec"] for r in rs)
        secs = statistics.mean(r["train_eval_seconds"] for r in rs)
        lines.append(f"| {row} | {ROWS.get(row, ('?',))[0]} | {len(rs)} | {mean:.2f}%{spread} | {delta} | {tta_s} | {ips:.0f} | {secs:.0f} | {_kept(row)} |")
    return "\n".join(lines)


def _kept(row: str) -> str:
    """A "-X" row removes something the recipe has; any other row tries what the recipe does not do."""
    if row == "recipe" or row.startswith(("old-", "spec-")):
        return ""
    return "kept" if row.startswith("-") else "not kept"


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    done = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    mine = [r for r in done if r["config"] == args.config and r["data_dir"] == args.data_dir and r["extra"] == args.extra]
    if not args.table_only:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; choose from: {', '.join(ROWS)}")
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="recipe-"))
        out.parent.mkdir(parents=True, exist_ok=True)
        for row in rows:
            for seed in args.seeds:
                if any(r["row"] == row and r["seed"] == seed for r in mine):
                    continue
                result = run_one(args, row, seed, workdir)
                mine.append(result)
                with open(out, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"{row} seed {seed}: {result['test_acc']:.2f}% ({result['train_eval_seconds']:.0f} s)", flush=True)
    print(f"\n{args.config} on {args.data_dir} {' '.join(args.extra)} (CPU: {cpu_kind()})")
    print(table(mine))


if __name__ == "__main__":
    main()
