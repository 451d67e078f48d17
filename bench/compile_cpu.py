"""torch.compile on this CPU: whether `--compile` pays for PreActResNet18's training step here.

    python bench/compile_cpu.py [--widths 0.5] [--precisions bf16,fp32] [--steps 15] [--batch 128]

Whole training steps as optimize_system.py times them (`optimize.time_setting`: batched augmentation, forward,
backward, the 15-minute recipe's Muon step, channels_last), eager against torch.compile (inductor), warm-up
excluded; eager and compiled alternate for --rounds rounds and their medians are compared (the range of the
per-round ratios beside). The first compiled call (compilation included) is printed too: a --time-budget run pays it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preactresnet.config import TrainConfig  # noqa: E402
from preactresnet.optimize import time_setting  # noqa: E402
from preactresnet.system import cpu_kind, cpu_name  # noqa: E402

MUON = TrainConfig(optimizer="muon", lr=0.02, muon_ns_dtype="fp32")  # configs/cpu_15min.yaml's optimizer, one NS dtype for all rows
WARMUP = 3  # untimed steps per setting: the compiled one compiles in the first


def row(width: float, precision: str, steps: int, batch: int, rounds: int) -> str:
    device = torch.device("cpu")
    setting = {"amp": precision, "channels_last": "on", "threads": 0}
    figures: dict[bool, list[float]] = {False: [], True: []}
    first_compiled = 0.0
    for _ in range(rounds):  # eager and compiled alternate: this host's speed drifts by tens of percent within minutes
        for compiled in (False, True):
            start = time.perf_counter()
            figures[compiled].append(time_setting("preactresnet18", width, batch, device, {**setting, "compile": compiled},
                                                  WARMUP, steps, MUON))
            first_compiled = first_compiled or (time.perf_counter() - start if compiled else 0.0)
    eager, compiled = statistics.median(figures[False]), statistics.median(figures[True])
    ratios = [c / e for c, e in zip(figures[True], figures[False])]
    ms = 1000 * batch
    return (f"| x{width:g} | {precision} | {ms / eager:.0f} | {ms / compiled:.0f} | x{compiled / eager:.2f} "
            f"(x{min(ratios):.2f}-x{max(ratios):.2f}) | {first_compiled:.0f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="0.5", help="comma-separated width multipliers of PreActResNet18")
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16 (autocast) and/or fp32")
    p.add_argument("--steps", type=int, default=15, help="timed steps per figure, after the untimed warm-up ones")
    p.add_argument("--batch", type=int, default=128, help="batch size of the timed steps")
    p.add_argument("--rounds", type=int, default=3, help="alternating eager/compiled rounds; the medians are compared")
    a = p.parse_args()
    print(f"{cpu_name()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}, batch {a.batch}")
    print(f"\n| width | precision | eager ms/step | compiled ms/step | speed-up, medians (range over rounds) "
          f"| first compiled call ({WARMUP} + {a.steps} steps) |")
    print("|---|---|---:|---:|---:|---:|")
    for width in (float(w) for w in a.widths.split(",")):
        for precision in a.precisions.split(","):
            print(row(width, precision, a.steps, a.batch, a.rounds), flush=True)


if __name__ == "__main__":
    main()
