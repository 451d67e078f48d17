"""Training steps of a trained network with denormal floats flushed to zero (FTZ/DAZ, train.py's default) and kept.

    python bench/denormal.py [--resume RUN_FOLDER] [--steps 24]     # default: the newest run under checkpoints/

Late in training the gradients and Muon's momentum of channels that weight decay has silenced hold denormal floats,
and each operation on one costs the CPU a slow microcode assist: a 15-minute run's step ran at 530 images/s at its start
and at 170 by its end. The timed network is a run's last state (weights, optimizer, loader), trained on from there
for --warmup untimed steps and then timed. Each side runs in its own process: the threads torch starts inherit the
setting of the thread that starts them. (The bundled weights do not show it: stored in fp16, the silenced weights
are exact zeros.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(run: str, side: str, warmup: int, steps: int) -> None:
    """One side: resume the run (the trainer flushes or not), take `warmup` steps, print images/s over `steps`."""
    import torch

    import preactresnet.precision as precision
    from preactresnet.config import parse_args
    from preactresnet.training import Trainer

    # the run's saved setting decides on resume (it changes numbers): this side's is applied in its place, at the same point
    precision.flush_denormals = lambda on=True: torch.set_flush_denormal(side == "flush")
    cfg, explicit = parse_args(["--resume", run, "--no-progress", "--profile", "off", "--compile", "off", "--no-figures"])
    t = Trainer.from_config(cfg, explicit, out=lambda *a: None)
    t.plan.total_steps, t.budget = 10**9, None  # on past the run's end, nothing to re-plan
    t.train_steps(warmup)
    stats = t.train_steps(steps)
    print(f"{stats.images / stats.seconds:.1f}")


def newest_run(checkpoint_dir: str) -> str:
    from preactresnet.inference import newest_run_weights

    found = newest_run_weights(checkpoint_dir, "last.state.pt")
    if found is None:
        raise SystemExit(f"no run under {checkpoint_dir}/: train one (python train.py --config configs/cpu_15min.yaml "
                         "--data-dir ...) or pass --resume RUN_FOLDER")
    return str(found.parent)


def main() -> None:
    ap = argparse.ArgumentParser(description="training images/s of a trained network, denormals flushed or kept")
    ap.add_argument("--resume", default="", help="the run folder to time (default: the newest under --checkpoint-dir)")
    ap.add_argument("--checkpoint-dir", default="checkpoints", help="where runs are (train.py's --checkpoint-dir)")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per side and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="processes per side, alternating: kept, flushed, kept, flushed")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocations, kernel choice)")
    ap.add_argument("--child", choices=["flush", "keep"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    run = args.resume or newest_run(args.checkpoint_dir)
    if args.child:
        return child(run, args.child, args.warmup, args.steps)
    from preactresnet.system import cpu_kind

    rates: dict[str, list[float]] = {"keep": [], "flush": []}
    for _ in range(args.repeats):
        for side in rates:
            cmd = [sys.executable, __file__, "--resume", run, "--steps", str(args.steps), "--warmup", str(args.warmup), "--child", side]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"the {side} side failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
            rates[side].append(float(done.stdout.split()[-1]))
    keep, flush = max(rates["keep"]), max(rates["flush"])
    print(f"{run}, {cpu_kind()}: denormals kept {keep:.1f} images/s, flushed {flush:.1f} images/s ({flush / keep:.2f}x; "
          f"each process: kept {rates['keep']}, flushed {rates['flush']})")


if __name__ == "__main__":
    main()
