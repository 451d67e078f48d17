"""The measured rows the README's picture and BENCHMARKS.md are drawn from agree with themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("*.jsonl"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_a_runs_last_epoch_is_its_final_accuracy(path):
    """A row's per-epoch accuracies are its own run's: the last is the (raw) final figure (a copy error fails)."""
    wrong = [(r.get("row") or r.get("point"), r["seed"]) for r in rows(path)
             if r.get("by_epoch") and r["by_epoch"][-1] != r.get("raw_test_acc", r["test_acc"])]
    assert not wrong


def test_every_curve_point_names_its_data_machine_date_and_command():
    needed = {"point", "seed", "minutes", "test_acc", "data", "cpu", "date", "command"}
    runs = rows(ROOT / "bench" / "results" / "cpu_curve.jsonl")
    assert runs and all(needed <= set(r) for r in runs)
    seeds = [(r["cpu"], r["point"], r["seed"]) for r in runs]
    assert len(seeds) == len(set(seeds))  # a seed of a point on a CPU kind is measured once


def test_throughput_benchmark_counts_a_training_images_arithmetic():
    """bench/train_throughput.py's roofline line: PreActResNet18's forward is the known 0.56 GMAC a 32x32 image,
    a training step three times that (input and weight gradients) less the stem's unneeded input gradient."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from train_throughput import matmul_gflops, roofline, train_gflop

    from preactresnet.config import TrainConfig

    full, half = train_gflop(TrainConfig(), 10), train_gflop(TrainConfig(width_mult=0.5), 10)
    assert 3 * 2 * 0.550 < full < 3 * 2 * 0.560
    assert 0.24 < half / full < 0.26  # the arithmetic scales with width squared
    assert matmul_gflops(torch.float32, torch.device("cpu"), n=64, reps=1) > 0
    line = roofline(full, 50.0, 100.0, torch.bfloat16, torch.device("cpu"), n=64)
    assert "reference 166 GFLOP/s" in line and "trainer 333 GFLOP/s" in line and "allows about" in line
