"""The run's length in steps (`RunPlan`): one record that the schedule, the loop, the bars, the log and the
saved state read. A run given --epochs/--total-steps keeps its plan; a --time-budget run's plan is re-planned
as it goes (budget.py), and the learning-rate schedule follows it through `schedule_step`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import TrainConfig


def warmup_length(wanted: int, fraction: float, total: int) -> int:
    """The warmup steps of a `total`-step run: what --warmup-epochs asks, at most `fraction` of the run and one step
    short of its end, so that a run shorter than its warmup (a small budget on a slow CPU) still decays."""
    return max(0, min(wanted, int(fraction * total), total - 1))


@dataclass
class RunPlan:
    """The run's length in steps, and where the learning-rate schedule stands at each step.

    The schedule is built once for the first plan (`schedule_steps`, `schedule_warmup`); `knots` (step, schedule
    step) record where a re-plan stretched what was still to go (the warmup's rest, the decay) over the steps now
    planned. No knots: the schedule step is the step."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    schedule_steps: int = 0  # the length the schedule was built for (the first plan's)
    schedule_warmup: int = -1  # the warmup it was built with
    warmup_wanted: int = -1  # what --warmup-epochs asks: a re-plan inside the warmup gives it back
    knots: list = field(default_factory=list)
    warmup_fraction: float = 1.0  # --warmup-max-fraction (1.0 in states saved before it: their plans stay as they were)

    def __post_init__(self):
        self.schedule_steps = self.schedule_steps or self.total_steps
        self.schedule_warmup = self.warmup_steps if self.schedule_warmup < 0 else self.schedule_warmup
        self.warmup_wanted = self.warmup_steps if self.warmup_wanted < 0 else self.warmup_wanted

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int, total_steps: int = 0, saved: dict | None = None) -> RunPlan:
        """--epochs/--total-steps (or `total_steps`), with --warmup-epochs cut to --warmup-max-fraction of the run;
        a resumed time budget's plan as it was `saved`."""
        if saved:
            return cls.from_state(saved)
        total = total_steps or cfg.total_steps or cfg.epochs * steps_per_epoch
        wanted = int(round(cfg.warmup_epochs * steps_per_epoch))
        return cls(steps_per_epoch, total, warmup_length(wanted, cfg.warmup_max_fraction, total), warmup_wanted=wanted,
                   warmup_fraction=cfg.warmup_max_fraction)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def evaluates(self, ended: int, every: int) -> bool:
        """Whether the end of epoch `ended` (1-based) evaluates: the plan's last always, else each `every`-th (0: none)."""
        return ended >= self.epochs or (every > 0 and ended % every == 0)

    def schedule_step(self, step: int) -> float:
        """Where the schedule stands after `step` steps: piecewise linear through the knots to its end."""
        if not self.knots or step <= self.knots[0][0]:
            return step
        ends = [*self.knots, (self.total_steps, self.schedule_steps)]
        for (s0, v0), (s1, v1) in zip(ends, ends[1:]):
            if step <= s1:
                return v0 + (step - s0) * (v1 - v0) / (s1 - s0)
        return self.schedule_steps

    def replan(self, step: int, total: int) -> None:
        """`total` steps in all from `step` on: the schedule keeps its value at `step`; inside the warmup, the warmup
        ends where --warmup-epochs asks (cut to the new run's share), at the schedule's peak."""
        assert total > step, "a re-plan keeps at least one step to take"
        knots = [k for k in self.knots if k[0] < step] + [(step, self.schedule_step(step))]
        if step < self.warmup_steps:
            self.warmup_steps = max(step, warmup_length(self.warmup_wanted, self.warmup_fraction, total))
            if self.warmup_steps > step:
                knots.append((self.warmup_steps, self.schedule_warmup))
        self.knots, self.total_steps = knots, total

    def length(self) -> dict:
        """Its epochs and steps, as a time budget's weights carry them in their metadata (export and the model card read it)."""
        return {"epochs": self.epochs, "total_steps": self.total_steps}

    def state_dict(self) -> dict:
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "schedule_steps": self.schedule_steps, "schedule_warmup": self.schedule_warmup,
                "warmup_wanted": self.warmup_wanted, "knots": [list(k) for k in self.knots],
                "warmup_fraction": self.warmup_fraction}

    @classmethod
    def from_state(cls, state: dict) -> RunPlan:
        return cls(**{**state, "knots": [tuple(k) for k in state["knots"]]})


class PlannedSchedule:
    """timm's step schedule, read at the plan's schedule step (the step itself for a fixed plan)."""

    def __init__(self, scheduler, plan: RunPlan):
        self.scheduler, self.plan = scheduler, plan

    def step_update(self, num_updates: int, metric=None) -> None:
        self.scheduler.step_update(num_updates=self.plan.schedule_step(num_updates))
