"""torch.compile on this CPU: whether `--compile` pays for PreActResNet18's training step here.

    python bench/compile_cpu.py [--widths 0.5] [--precisions bf16,fp32] [--steps 15] [--batch 128]

Forward and backward (cross-entropy, channels_last, the autocast --amp uses) of the eager model against the
same model under torch.compile (inductor), warm-up and compilation excluded from the per-step figures; the
eager model is timed before and after the compiled one, and the faster of the two is the baseline. The
first compiled step is printed too: a --time-budget run pays it out of its budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preactresnet.models import create_model  # noqa: E402
from preactresnet.system import cpu_kind, cpu_name  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def seconds_per_step(call, x, y, dtype, steps: int) -> float:
    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = call(x)
        F.cross_entropy(logits.float(), y).backward()

    step(), step()  # untimed: first-touch allocations, kernel choice
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / max(steps, 1)


def row(width: float, precision: str, steps: int, batch: int) -> str:
    torch.manual_seed(0)
    model = create_model("preactresnet18", num_classes=10, width_mult=width).to(memory_format=torch.channels_last).train()
    x, y = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last), torch.randint(0, 10, (batch,))
    dtype = DTYPES[precision]
    before = seconds_per_step(model, x, y, dtype, steps)
    compiled = torch.compile(model)
    start = time.perf_counter()
    seconds_per_step(compiled, x, y, dtype, 0)  # the two untimed steps: compilation happens here
    first = time.perf_counter() - start
    after_compile = seconds_per_step(compiled, x, y, dtype, steps)
    eager = min(before, seconds_per_step(model, x, y, dtype, steps))
    return (f"| x{width:g} | {precision} | {1000 * eager:.0f} | {1000 * after_compile:.0f} | "
            f"x{eager / after_compile:.2f} | {first:.0f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="0.5", help="comma-separated width multipliers of PreActResNet18")
    p.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16 (autocast) and/or fp32")
    p.add_argument("--steps", type=int, default=15, help="timed steps per figure, after two untimed ones")
    p.add_argument("--batch", type=int, default=128, help="batch size of the timed steps")
    a = p.parse_args()
    print(f"{cpu_name()} ({cpu_kind()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"kernels {torch.backends.cpu.get_cpu_capability()}, batch {a.batch}")
    print("\n| width | precision | eager ms/step | compiled ms/step | speed-up | first compiled step (2 steps) |")
    print("|---|---|---:|---:|---:|---:|")
    for width in (float(w) for w in a.widths.split(",")):
        for precision in a.precisions.split(","):
            print(row(width, precision, a.steps, a.batch), flush=True)


if __name__ == "__main__":
    main()
