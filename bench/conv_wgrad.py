"""--conv-wgrad on this CPU: each conv shape's weight gradient by oneDNN and by one matmul, and whole training steps
with --conv-wgrad aten against auto.

    python bench/conv_wgrad.py [--widths 0.5] [--compile off,on] [--steps 20] [--rounds 3] [--batch 128]

First, for every distinct conv of PreActResNet18 at each width, milliseconds of its weight gradient both ways
(`convgrad.time_shape`, timed afresh, not read from the cache). Then whole training steps as optimize_system.py times
them (`optimize.time_setting`: batched augmentation, forward, backward, the 15-minute recipe's Muon step, bf16,
channels_last), aten and auto alternating for --rounds rounds (this host's speed drifts within minutes): the medians
are compared, the range of the per-round ratios beside. Warm-up steps (a compilation's included) are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preactresnet import convgrad  # noqa: E402
from preactresnet.config import TrainConfig  # noqa: E402
from preactresnet.models import create_model  # noqa: E402
from preactresnet.optimize import time_setting  # noqa: E402
from preactresnet.system import cpu_kind, cpu_name  # noqa: E402

MUON = TrainConfig(optimizer="muon", lr=0.02, muon_ns_dtype="fp32")  # configs/cpu_15min.yaml's optimizer
WARMUP = 3  # untimed steps per figure: a compiled one compiles in the first


def shape_rows(width: float, batch: int) -> None:
    shapes = convgrad.conv_inputs(create_model("preactresnet18", width_mult=width), (3, 32, 32), batch)
    print(f"\n| x{width:g}: conv (in->out, map, stride) | convs | oneDNN ms | matmul ms | matmul speed-up |\n|---|---:|---:|---:|---:|")
    for shape in sorted(set(shapes.values()), key=lambda s: (-s[2], s[1])):
        ms = convgrad.time_shape(shape, torch.bfloat16, True)
        _, cin, h, w, cout, k, s, _ = shape
        print(f"| {cin}->{cout}, {h}x{w}, k{k} s{s} | {list(shapes.values()).count(shape)} | {ms['aten']:.2f} | "
              f"{ms['matmul']:.2f} | x{ms['aten'] / ms['matmul']:.2f} |", flush=True)


def step_row(width: float, compiled: bool, steps: int, batch: int, rounds: int) -> str:
    setting = {"amp": "bf16", "channels_last": "on", "threads": 0, "compile": compiled}
    figures: dict[str, list[float]] = {"aten": [], "auto": []}
    for _ in range(rounds):
        for choice in figures:
            figures[choice].append(time_setting("preactresnet18", width, batch, torch.device("cpu"),
                                                {**setting, "conv_wgrad": choice}, WARMUP, steps, MUON))
    aten, auto = statistics.median(figures["aten"]), statistics.median(figures["auto"])
    ratios = [b / a for a, b in zip(figures["aten"], figures["auto"])]
    return (f"| x{width:g} | {'compiled' if compiled else 'eager'} | {aten:.0f} | {auto:.0f} | "
            f"x{auto / aten:.2f} (x{min(ratios):.2f}-x{max(ratios):.2f}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="0.5", help="comma-separated width multipliers of PreActResNet18")
    p.add_argument("--compile", default="off,on", help="comma-separated: off (eager) and/or on (torch.compile)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per figure, after the untimed warm-up")
    p.add_argument("--batch", type=int, default=128, help="batch size")
    p.add_argument("--rounds", type=int, default=3, help="alternating aten/auto rounds; the medians are compared")
    a = p.parse_args()
    widths = [float(w) for w in a.widths.split(",")]
    print(f"{cpu_name()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}, batch {a.batch}, bf16")
    for width in widths:
        shape_rows(width, a.batch)
    print("\n| width | step | images/s, --conv-wgrad aten | auto | speed-up, medians (range over rounds) |\n|---|---|---:|---:|---:|")
    for width in widths:
        for compiled in (c == "on" for c in a.compile.split(",")):
            print(step_row(width, compiled, a.steps, a.batch, a.rounds), flush=True)


if __name__ == "__main__":
    main()
