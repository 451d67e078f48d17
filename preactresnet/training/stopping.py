"""Stopping a run: the signal flag (SIGTERM, Ctrl-C), what a stop raises, the resume hint, a bad loss.

Agreeing on a stop across torchrun's ranks is distributed.Agreement; saving on the way out is the loop's.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path

from ..distributed import DistInfo


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


class StopFlag:
    """SIGTERM (a scheduler's preemption) or the first Ctrl-C: finish the step, save, exit with 128 + the
    signal's number (143 or 130). A second Ctrl-C stops at once; a repeated SIGTERM changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.stop = False
        self.signum = signal.SIGTERM
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.stop:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.stop, self.signum = True, signum
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


def check_finite(trainer, value: float, epoch: int) -> None:
    """A non-finite training loss stops the run without saving: the last good checkpoint stays."""
    if not math.isfinite(value):
        raise NonFiniteLoss(
            f"training loss became {value} in epoch {epoch + 1} (step {trainer.step}); stopped without saving, "
            f"so {trainer.dirs.checkpoints}/last.* still holds the last good epoch. Lower --lr or set --grad-clip"
        )
