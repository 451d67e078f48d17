"""Stopping a run: the signal flag (SIGTERM, Ctrl-C), what a stop raises, the resume hint, a bad loss.

`StopControl` is the one place a stop is asked for and agreed on; saving on the way out is the loop's.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..distributed import Agreement, DistInfo, sum_over_ranks


def resume_command(dist: DistInfo, argv0: str | None = None) -> str:
    """How this run was launched, for the resume hint: python train.py, a console script, or torchrun."""
    argv0 = argv0 if argv0 is not None else (sys.argv[0] if sys.argv and sys.argv[0] else "train.py")
    name = Path(argv0).name
    if dist.enabled:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(dist.world_size))
        return f"torchrun --nproc_per_node={per_node} (and this run's other torchrun options) {name}"
    return f"python {name}" if name.endswith(".py") else name


class NonFiniteLoss(Exception):
    pass


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its full state (a KeyboardInterrupt, as Ctrl-C always
    was); `code` is the exit status to use."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopControl:
    """The one answer to "stop now?": SIGTERM (a scheduler's preemption) or the first Ctrl-C sets the request;
    the run finishes the step, saves and exits with 128 + the signal's number (143 or 130). A second Ctrl-C
    stops at once; a repeated SIGTERM changes nothing. Under torchrun the ranks agree (host values through
    gloo, no GPU synchronization): between steps about once a second, before each evaluation batch, and on
    the flag that rides with the loss's all-reduce, so every rank stops at the same step. The signal's request
    (`signalled`) is kept apart from the ranks' decision (`requested`): a signal that lands during or after an
    agreement is carried to the next one, never lost or acted on by one rank alone."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dist: DistInfo):
        self.dist = dist
        self.signalled = False  # a signal reached this process
        self.requested = False  # the decision to stop: this process's signal alone, or agreed by the ranks
        self.signum = signal.SIGTERM
        self.agreement = Agreement(dist)  # when the ranks compare their requests between steps
        self._previous: dict = {}

    def poll(self) -> bool:
        """Between two steps: at once alone; under torchrun whether any rank asked, within about a second."""
        if self.agreement.poll(self.signalled):
            self.requested = True
        return self.requested

    def flag(self, device) -> torch.Tensor:
        """This rank's request as a tensor, to ride with an all-reduce the loop makes anyway."""
        return torch.full((), float(self.signalled or self.requested), device=device)

    def agree_now(self, device, all_reduce) -> bool:
        """At an epoch's start: whether to stop (under torchrun: any rank's request, e.g. from the last epoch's end)."""
        if self.dist.enabled:
            self.agreed(sum_over_ranks(all_reduce, self.flag(device))[0])
        return self.requested

    def agreed(self, summed: float) -> bool:
        """The all-reduced flag: any rank's request is every rank's."""
        self.requested = self.requested or summed > 0
        return self.requested

    def before_batches(self, loader) -> Callable[[int], bool] | None:
        """The check before each evaluation batch that every rank has (their shards differ by one image at
        most), so a signal during evaluation is acted on within one batch."""
        if loader is None:
            return None
        common = math.ceil(len(loader.labels) // self.dist.world_size / loader.batch_size)
        return lambda i: i < common and self.agreed(float(self.agreement.meet(self.signalled)))

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.signalled:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signalled, self.signum = True, signum
        self.requested = self.requested or not self.dist.enabled  # alone nothing to agree on; under torchrun the ranks decide
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"\n{name}: finishing this step, saving, then exiting{again}", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


def check_finite(value: float, epoch: int, step: int, checkpoints: Path) -> None:
    """A non-finite training loss stops the run without saving: the last good checkpoint stays."""
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"training loss became {value} in epoch {epoch + 1} (step {step}); stopped without saving, "
            f"so {checkpoints}/last.* still holds the last good epoch. Lower --lr or set --grad-clip"
        )


def stop_message(checkpoints: Path, step: int, dist: DistInfo) -> str:
    """What a stopped run says: where its state is and the command that continues it."""
    return (f"stopped: saved {checkpoints}/last.state.pt at step {step}; continue with "
            f"{resume_command(dist)} --resume {checkpoints}")
