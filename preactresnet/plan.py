"""The run's length in steps (`RunPlan`): one record that the schedule, the loop, the bars, the log and the
saved state read. A run given --epochs/--total-steps keeps its plan; a --time-budget run's plan is re-planned
as it goes (budget.py), and the learning-rate schedule follows it through `schedule_step`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import TrainConfig


@dataclass
class RunPlan:
    """The run's length in steps, and where the learning-rate schedule stands at each step.

    The schedule is built once for `schedule_steps`; `knots` (step, schedule step) record where a re-plan
    stretched the decay still to go over a new `total_steps`. No knots: the schedule step is the step."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    schedule_steps: int = 0  # the length the schedule was built for (the first plan's)
    knots: list = field(default_factory=list)

    def __post_init__(self):
        self.schedule_steps = self.schedule_steps or self.total_steps

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int, total_steps: int = 0) -> RunPlan:
        """--epochs/--total-steps (or `total_steps`), with --warmup-epochs cut short only by a shorter run."""
        total = total_steps or cfg.total_steps or cfg.epochs * steps_per_epoch
        return cls(steps_per_epoch, total, min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1))

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of `epoch` in this plan (the last may be partial)."""
        return max(0, min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch))

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
        """`total` steps from now on; the schedule keeps its value at `step` and at the end of the warmup."""
        at = max(step, self.warmup_steps)
        assert total > at, "a re-plan keeps at least one step after the warmup and the steps taken"
        here = self.schedule_step(at)
        self.knots = [k for k in self.knots if k[0] < at] + [(at, here)]
        self.total_steps = total

    def state_dict(self) -> dict:
        return {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "schedule_steps": self.schedule_steps, "knots": [list(k) for k in self.knots]}

    @classmethod
    def from_state(cls, state: dict) -> RunPlan:
        return cls(**{**state, "knots": [tuple(k) for k in state["knots"]]})


class PlannedSchedule:
    """timm's step schedule, read at the plan's schedule step (the step itself for a fixed plan)."""

    def __init__(self, scheduler, plan: RunPlan):
        self.scheduler, self.plan = scheduler, plan

    def step_update(self, num_updates: int, metric=None) -> None:
        self.scheduler.step_update(num_updates=self.plan.schedule_step(num_updates))
