"""Whether this checkout trains bit-identical weights to another commit: the same seeded, deterministic run
with each commit's code (a git worktree), weights compared tensor by tensor.

    python bench/same_numbers.py c6701cf --fixed          # every machine-dependent choice fixed
    python bench/same_numbers.py HEAD~1                   # the demo recipe as it is (Muon, whitening, auto precision)
    python bench/same_numbers.py ff6ffb0 --fixed-precision  # the demo recipe, fp32 network and orthogonalization

--fixed adds --optimizer sgd --lr 0.1 --amp off --channels-last off --no-whiten-stem (what c6701cf and
today's code choose alike on any machine). Both runs use this machine, one after the other, and one precision cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
FIXED = ["--optimizer", "sgd", "--lr", "0.1", "--amp", "off", "--channels-last", "off", "--no-whiten-stem"]
PRECISION = ["--amp", "off", "--muon-ns-dtype", "fp32"]  # the demo recipe itself, with the timed precision choices fixed


def train(code: Path, out: Path, args: list[str], cache: Path) -> dict[str, torch.Tensor]:
    """Run train.py from `code` (its own package first on the path) and return its last weights. `cache`: the
    precision cache both runs share, so a timed choice (--amp/--muon-ns-dtype auto) is made once, not twice
    (a busy machine could time it differently the second time)."""
    # this checkout's demo recipe for both (a recipe retuned since is not a difference in the code)
    cmd = [sys.executable, str(code / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--deterministic",
           "--seed", "0", "--no-progress", "--profile", "off", "--tta", "none", "--run-name", "same",
           "--checkpoint-dir", str(out / "ck"), "--log-dir", str(out / "runs"), "--fig-dir", str(out / "fig"), *args]
    env = {**os.environ, "PYTHONPATH": str(code), "PREACTRESNET_PRECISION_CACHE": str(cache)}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the run with {code} failed:\n{done.stderr[-2000:]}")
    return load_file(out / "ck" / "same" / "last.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit", help="the commit to compare with (c6701cf, HEAD~1, ...)")
    ap.add_argument("--fixed", action="store_true", help="fix every machine-dependent choice (SGD, fp32, NCHW, no whitening)")
    ap.add_argument("--fixed-precision", action="store_true", help="the demo recipe with --amp off --muon-ns-dtype fp32: "
                    "no timed choice between the two runs")
    ap.add_argument("--epochs", default="2", help="epochs of the demo recipe to train")
    ap.add_argument("--max-steps-per-epoch", default="20", help="steps per epoch")
    args = ap.parse_args()
    extra = ["--epochs", args.epochs, "--max-steps-per-epoch", args.max_steps_per_epoch] + (FIXED if args.fixed else [])
    extra += PRECISION if args.fixed_precision and not args.fixed else []
    with tempfile.TemporaryDirectory(prefix="same-") as tmp:
        tmp = Path(tmp)
        other = tmp / "other"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.commit], check=True,
                       capture_output=True)
        try:
            (tmp / "a").mkdir(), (tmp / "b").mkdir()
            theirs, ours = train(other, tmp / "a", extra, tmp / "precision.json"), train(ROOT, tmp / "b", extra, tmp / "precision.json")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    differ = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
    print(f"{args.commit} vs this checkout, demo recipe {' '.join(extra)} (CPU: {torch.backends.cpu.get_cpu_capability()}): "
          + ("bit-identical weights" if not differ and ours.keys() == theirs.keys() else f"{len(differ)} tensors differ: {differ[:5]}"))
    raise SystemExit(0 if not differ else 1)


if __name__ == "__main__":
    main()
