"""Host synchronizations per optimizer step: the calls that make a GPU wait for the host.

    python bench/sync_count.py [--where preactresnet/data/] [train.py flags: added to the command below; --config replaces it]

Default run: `train.py --config configs/demo.yaml --epochs 1 --max-steps-per-epoch 30 --jitter-prob 0.8
--erase-prob 0.25 --mix-prob 0.5`, on whatever device this machine has. Counted, by the file and
line that makes them: the calls that synchronize on a GPU (`.item`, `.tolist`, `nonzero`,
`bool(tensor)`, `.cpu`, `.numpy`) and the ones that build a device tensor from Python values
(`torch.tensor`, `torch.as_tensor`, a host-to-device copy each). Counting starts at the first
optimizer step, so loading the data is excluded, and covers the evaluation at the end too.
On a CPU nothing waits, but the same calls are made: the count is the GPU's, measured anywhere.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARM = 3  # steps not watched by CUDA's count: the first build constants and choose kernels once
TENSOR_METHODS = ("item", "tolist", "nonzero", "__bool__", "cpu", "numpy")
TORCH_FUNCTIONS = ("tensor", "as_tensor", "nonzero")
ISSUE_COMMAND = [
    "--config", "configs/demo.yaml", "--epochs", "1", "--max-steps-per-epoch", "30", "--jitter-prob", "0.8",
    "--erase-prob", "0.25", "--mix-prob", "0.5",
]


class SyncCounter:
    """Counts synchronizing calls made from files under `where` while `active` (a file:line Counter)."""

    def __init__(self, where: str | Path):
        self.where = str((ROOT / where).resolve()) if not Path(where).is_absolute() else str(where)
        self.active = False
        self.calls: Counter = Counter()

    def _wrap(self, name: str, fn):
        counter = self

        def wrapper(*args, **kwargs):
            if counter.active:
                frame = sys._getframe(1)
                if frame.f_code.co_filename.startswith(counter.where):
                    rel = Path(frame.f_code.co_filename).relative_to(ROOT)
                    counter.calls[f"{name} at {rel}:{frame.f_lineno}"] += 1
            return fn(*args, **kwargs)

        return wrapper

    @contextmanager
    def patched(self):
        saved = [(torch.Tensor, m, getattr(torch.Tensor, m)) for m in TENSOR_METHODS]
        saved += [(torch, f, getattr(torch, f)) for f in TORCH_FUNCTIONS]
        try:
            for owner, name, fn in saved:
                label = f"torch.{name}" if owner is torch else f".{name}()"
                setattr(owner, name, self._wrap(label, fn))
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def count_training(argv: list[str], where: str = "preactresnet/data/") -> tuple[SyncCounter, int]:
    """Run train.py with `argv`, counting from the first optimizer step; returns (counter, optimizer steps)."""
    import preactresnet.training as training
    from preactresnet.config import parse_args

    counter = SyncCounter(where)
    counter.in_steps, counter.calls_in_steps, counter.steps_watched = 0, 0, 0  # inside the steps after the first WARM
    original = training.Trainer._step

    def step(self, x, y):
        if not counter.active and self.startup.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")  # and CUDA's own account of every synchronization
        counter.active = True
        before, calls = len(caught), counter.total
        loss = original(self, x, y)
        if self.step >= WARM:  # the first steps build constants and choose kernels once
            counter.in_steps += sum("synchroniz" in str(w.message) for w in caught[before:])
            counter.calls_in_steps += counter.total - calls
            counter.steps_watched += 1
        return loss

    cfg, explicit = parse_args(argv)
    training.Trainer._step = step
    try:
        with counter.patched(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = training.Trainer.from_config(cfg, explicit, out=lambda *a: None)
            trainer.fit()
    finally:
        training.Trainer._step = original
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
    counter.cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
    return counter, trainer.step


def main() -> None:
    ap = argparse.ArgumentParser(description="host synchronizations per optimizer step, by call site")
    ap.add_argument("--where", default="preactresnet/data/", help="count calls made from files under this folder")
    args, rest = ap.parse_known_args()
    flags = rest if "--config" in rest else [*ISSUE_COMMAND, *rest]  # extra flags add to the issue's command
    out = ["--no-progress", "--profile", "off", "--checkpoint-dir", "/tmp/sync-count/ck", "--log-dir", "/tmp/sync-count/runs",
           "--fig-dir", "/tmp/sync-count/fig", "--run-name", "sync-count"]
    counter, steps = count_training([*flags, *out], args.where)
    print(f"python train.py {' '.join(flags)}")
    print(f"{counter.total} synchronizing calls from {args.where} in {steps} optimizer steps: "
          f"{counter.total / max(steps, 1):.2f} per step (counted from the first optimizer step on)")
    watched = max(counter.steps_watched, 1)
    if torch.cuda.is_available() and "cpu" not in " ".join(flags):
        print(f"CUDA sync debug mode: {counter.cuda_syncs} synchronizations in the whole run (its logging, "
              f"evaluation and checkpoints included): {counter.cuda_syncs / max(steps, 1):.2f} per step")
        print(f"inside the training steps: {counter.in_steps / watched:.2f} per step (CUDA sync debug mode, "
              f"{counter.steps_watched} steps watched, the first {steps - counter.steps_watched} not)")
    else:
        print(f"inside the training steps: {counter.calls_in_steps / watched:.2f} per step (calls from {args.where}, "
              f"{counter.steps_watched} steps watched, the first {steps - counter.steps_watched} not; a CPU has no CUDA sync debug mode)")
    print("| calls | site |\n|---:|---|")
    for site, n in counter.calls.most_common():
        print(f"| {n} | `{site}` |")


if __name__ == "__main__":
    main()
