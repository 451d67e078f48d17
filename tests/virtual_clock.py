"""A clock the test controls for --time-budget runs: steps, evaluations and checkpoints take the virtual seconds
the test sets (real work still runs), so a plan never depends on how loaded the machine is."""

from __future__ import annotations

import time


class VirtualTime:
    """The `time` module with a perf_counter that moves only when told."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def install(monkeypatch, step_seconds, eval_seconds=0.5, save_seconds=0.0) -> VirtualTime:
    """Virtual time for budget.py and the loop. `step_seconds(trainer)` is one step's cost (`trainer.budget` is None
    while it calibrates); an evaluation costs `eval_seconds`, each save of the run's state `save_seconds`."""
    import preactresnet.budget as budget
    import preactresnet.training.loop as loop
    from preactresnet.training import Trainer
    from preactresnet.training.state import Checkpointer

    clock = VirtualTime()
    step, evaluate, save = Trainer._step, Trainer.evaluate_epoch, Checkpointer.save_last

    def timed_step(self, x, y):
        clock.now += step_seconds(self)
        return step(self, x, y)

    def timed_evaluation(self):
        clock.now += eval_seconds
        return evaluate(self)

    def timed_save(self, epoch, record, plan):
        clock.now += save_seconds
        return save(self, epoch, record, plan)

    for module in (budget, loop):
        monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(Trainer, "_step", timed_step)
    monkeypatch.setattr(Trainer, "evaluate_epoch", timed_evaluation)
    monkeypatch.setattr(Checkpointer, "save_last", timed_save)
    return clock
