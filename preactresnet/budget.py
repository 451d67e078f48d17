"""The run's length (`RunPlan`) and --time-budget as a closed loop (`TimeBudget`).

A few seconds of calibration on the run's own steps start the loop (its steps are discarded); from then on
the run re-plans from its own measured progress: every `CHECK_SHARE` of the planned steps and at every
epoch end it compares the finish it now expects (seconds spent, steps left at the speed just measured, the
epoch ends left at their measured cost: evaluation, log, checkpoint) with the budget, and when that finish
leaves `BAND` it chooses the steps that fit again. The learning rate follows the plan through
`RunPlan.schedule_step`: the decay still to go is stretched (or squeezed) over the steps now planned, so
the rate is continuous at a re-plan and ends its decay at the last step; the warmup keeps its length.
A run given its length (--epochs, --total-steps) has a fixed plan and never re-plans.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .compiling import Timing, choose
from .config import TrainConfig
from .distributed import DistInfo, all_reduce_max
from .duration import parse_duration
from .plan import RunPlan

WARMUP_STEPS = 3  # first-touch allocations, kernel selection, torch.compile: never timed
MIN_TIMED_STEPS, MIN_TIMED_SECONDS = 5, 3.0  # timed until both are reached, for a stable images/s
CALIBRATION_SHARE = 0.05  # a short budget times for this share of it (at least 1 s): 10 s spends 1 s, not 3
MIN_STEPS = 5  # a budget that holds fewer steps than this (plus one evaluation) trains nothing worth having
CHECK_SHARE = 0.025  # progress is checked every 2.5% of the planned steps (and at every epoch end)
BAND = (0.985, 1.005)  # a plan whose expected finish stays inside this share of the budget is kept
SPEED_CHECKS = 4  # the speed is the last 4 stretches' (10% of the steps): one stretch's moved by 15% on a quiet CPU


def timed_seconds(budget_seconds: float) -> float:
    """How long calibration times steps: MIN_TIMED_SECONDS, or less for a budget under a minute."""
    return min(MIN_TIMED_SECONDS, max(1.0, CALIBRATION_SHARE * budget_seconds))


@dataclass(frozen=True)
class Calibration:
    seconds_per_step: float
    eval_seconds: float  # one evaluation
    batch_size: int
    end_seconds: float = 0.0  # one epoch end's log and checkpoint, once measured
    eval_every: int = 1  # --eval-every: which epoch ends evaluate (the last always does)

    @property
    def images_per_sec(self) -> float:
        return self.batch_size / self.seconds_per_step

    def ends_seconds(self, ended: int, last: int) -> float:
        """Seconds of the epoch ends after the `ended` ones done up to the `last`, which evaluates; of the others every
        `eval_every`-th evaluates (0: none), and each has its log and checkpoint."""
        if last <= ended:
            return 0.0
        every = self.eval_every
        evaluated = 1 + ((last - 1) // every - ended // every if every else 0)
        return (last - ended) * self.end_seconds + evaluated * self.eval_seconds


def fit_steps(seconds: float, step: int, ended: int, steps_per_epoch: int, cal: Calibration, least: int) -> int:
    """The most steps in all (at least `least`) whose steps after `step` and epoch ends after the `ended` ones
    already done fit in `seconds`: each epoch begun ends (its evaluation as --eval-every says), the last may be partial."""
    def total(n: int) -> int:  # the steps that fit with n epoch ends still to come
        return step + math.floor((seconds - cal.ends_seconds(ended, ended + n)) / cal.seconds_per_step)

    def fits(n: int) -> bool:  # n ends fit if their last epoch gets a step; true up to some n, false after
        return total(n) >= max((ended + n - 1) * steps_per_epoch + 1, step + 1)

    if not fits(1):
        return least
    low, high = 1, 2 + int(max(seconds, 0) / cal.seconds_per_step) // steps_per_epoch
    while low < high:  # the most epoch ends that fit; the run ends in the last of them, as late as it fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return max(least, min(total(low), (ended + low) * steps_per_epoch))


def expected_seconds(total: int, step: int, ended: int, steps_per_epoch: int, cal: Calibration) -> float:
    """Seconds from now to the end of a plan of `total` steps: its steps left and its epoch ends left."""
    return (total - step) * cal.seconds_per_step + cal.ends_seconds(ended, math.ceil(total / steps_per_epoch))


def first_plan(budget_seconds: float, cfg: TrainConfig, steps_per_epoch: int, cal: Calibration) -> RunPlan:
    """The most steps whose training and one evaluation per epoch begun fit the budget at the calibrated speed
    (only a budget below MIN_STEPS steps and an evaluation is refused)."""
    total = fit_steps(budget_seconds, 0, 0, steps_per_epoch, cal, least=0)
    if total < MIN_STEPS:
        least = math.ceil(MIN_STEPS * cal.seconds_per_step + cal.eval_seconds)
        raise ValueError(
            f"--time-budget {budget_seconds:g}s holds fewer than {MIN_STEPS} steps here ({cal.images_per_sec:.0f} "
            f"images/s plus {cal.eval_seconds:.1f}s of evaluation); give at least {least}s"
        )
    return RunPlan.of(cfg, steps_per_epoch, total)


class RunClock:
    """Seconds the run has spent training (steps, evaluations, logs, checkpoints), across resumes."""

    def __init__(self, spent_before: float = 0.0):
        self.before, self.origin = spent_before, None

    def start(self) -> None:
        self.origin = time.perf_counter()

    def spent(self) -> float:
        return self.before + (time.perf_counter() - self.origin if self.origin is not None else 0.0)


class TimeBudget:
    """--time-budget as a closed loop: checks the run's progress and re-plans its steps to end on the budget.

    The speed is the steps' own over the last SPEED_CHECKS stretches between checks, the epoch end's cost the last
    one measured (evaluation, log line, checkpoint); under torchrun the slowest rank's figures, at the same step
    on every rank, so all ranks follow one plan."""

    def __init__(self, seconds: float, calibration: Calibration, plan: RunPlan, dist: DistInfo, clock: RunClock,
                 compiled: bool = False):
        self.seconds, self.calibration, self.plan, self.dist, self.clock = seconds, calibration, plan, dist, clock
        self.compiled = compiled  # --compile auto chose the compiled step (a resume compiles it again)
        self.speed = calibration  # what the plan rests on now
        self.after_eval = 0.0  # the log and checkpoint after an evaluation, as last measured
        self.replans = 0
        self.window = (0.0, 0, 0.0)  # (spent, step) where the stretch of steps began, and its pauses
        self.marks = [(0.0, 0)]  # (seconds of steps so far, step) at the last checks
        self.next_check = 0

    def start(self, step: int, asked: str) -> str | None:
        """Open the first stretch of steps at `step` (the run's, or a resumed run's first step); a run resumed
        before its end gets the line saying what is left of the budget (`asked`: --time-budget as given)."""
        self.window, self.marks = (self.clock.spent(), step, 0.0), [(0.0, step)]
        self.next_check = step + self._every()
        if not 0 < step < self.plan.total_steps:  # a fresh run, or a finished one that only evaluates
            return None
        spent = self.clock.spent()
        return (f"time budget {asked}: {spent:.1f}s of {self.seconds:.0f}s spent before the stop, {max(self.seconds - spent, 0):.1f}s "
                f"left; {self.plan.total_steps - step} steps planned, re-planned as it goes")

    def length(self) -> dict:
        """The length chosen so far, for the weights' metadata (export's recipe and model card read it)."""
        return self.plan.length()

    def _every(self) -> int:
        return max(1, round(CHECK_SHARE * self.plan.total_steps))

    def due(self, step: int) -> bool:
        return step >= self.next_check and step < self.plan.total_steps

    def pause(self, seconds: float) -> None:
        """Seconds inside the current stretch that were not steps (the log and checkpoint of an epoch end)."""
        spent, step, paused = self.window
        self.window = (spent, step, paused + seconds)
        self.after_eval = seconds

    def check(self, step: int, ended: int, eval_seconds: float | None = None, device: torch.device | None = None,
              epoch_end: bool = False) -> str | None:
        """Measure the stretch since the last check; re-plan if the expected finish left BAND. `ended`: epoch ends
        done; `epoch_end`: at one (its log and checkpoint to come); `eval_seconds`: the evaluation it just did, if any.
        Returns the line to print, if any."""
        if device is not None:
            synchronize(device)  # the clock must count the work queued so far
        spent, _, paused = self.window
        now = self.clock.spent()
        stepping = self.marks[-1][0] + now - spent - paused - (eval_seconds or 0.0)
        self.marks = [*self.marks[-SPEED_CHECKS:], (stepping, step)]
        (t0, s0), (t1, s1) = self.marks[0], self.marks[-1]
        per_step = (t1 - t0) / (s1 - s0) if s1 > s0 else self.speed.seconds_per_step
        eval_cost = eval_seconds if eval_seconds is not None else self.speed.eval_seconds
        pending = self.after_eval if epoch_end else 0.0  # this epoch's log and checkpoint, to come
        now, per_step, eval_cost, end_cost = all_reduce_max([now + pending, per_step, eval_cost, self.after_eval],
                                                            self.dist)  # the slowest rank's
        self.speed = dataclasses.replace(self.calibration, seconds_per_step=max(per_step, 1e-9), eval_seconds=eval_cost,
                                         end_seconds=end_cost)
        self.window, self.next_check = (self.clock.spent(), step, 0.0), step + self._every()
        return self._replan(now, step, ended)

    def _replan(self, now: float, step: int, ended: int) -> str | None:
        plan, spe = self.plan, self.plan.steps_per_epoch
        if step >= plan.total_steps:
            return None  # the schedule has ended: the run is done
        finish = now + expected_seconds(plan.total_steps, step, ended, spe, self.speed)
        if BAND[0] * self.seconds <= finish <= BAND[1] * self.seconds:
            return None
        total = fit_steps(self.seconds - now, step, ended, spe, self.speed, least=step + 1)  # at least one more step
        if total == plan.total_steps:
            return None
        was = plan.total_steps
        plan.replan(step, total)
        self.replans += 1
        self.next_check = step + self._every()
        why = "ahead of" if finish < self.seconds else "behind"
        return (f"time budget: {now:.1f} of {self.seconds:.0f}s spent at step {step}, {self.speed.images_per_sec:.0f} "
                f"images/s and {self.speed.eval_seconds:.1f}s per evaluation measured, {why} the plan (it would end at "
                f"{finish:.1f}s): {total} steps ({total / spe:.2f} epochs) in all, was {was}")

    def record(self) -> dict:
        """What metrics.csv and TensorBoard show of the budget at an epoch end."""
        spe, spent = self.plan.steps_per_epoch, self.clock.spent()
        return {
            "time_budget_s": round(self.seconds, 1),
            "budget_spent_pct": round(100 * spent / self.seconds, 2),
            "planned_finish_s": round(spent + expected_seconds(self.plan.total_steps, self.window[1], self._ended(), spe, self.speed), 1),
            "budget_epochs": round(self.plan.total_steps / spe, 3),
            "budget_total_steps": self.plan.total_steps,
            "calibrated_images_per_sec": round(self.calibration.images_per_sec, 1),
            "planned_images_per_sec": round(self.speed.images_per_sec, 1),
            "replans": self.replans,
        }

    def _ended(self) -> int:
        return math.ceil(self.window[1] / self.plan.steps_per_epoch)

    def state_dict(self) -> dict:
        c, s = self.calibration, self.speed
        return {"seconds": self.seconds, "calibration": [c.seconds_per_step, c.eval_seconds, c.batch_size],
                "speed": [s.seconds_per_step, s.eval_seconds, s.batch_size, s.end_seconds], "after_eval": self.after_eval,
                "replans": self.replans, "compiled": self.compiled}

    @classmethod
    def from_state(cls, saved: dict, plan: RunPlan, dist: DistInfo, clock: RunClock, eval_every: int = 1) -> TimeBudget | None:
        """A resumed run's budget as its training state saved it (None: the run had none, or was saved before the
        closed loop, and keeps the plan it saved); `eval_every`: the resumed run's --eval-every."""
        if not (saved.get("plan") and saved.get("budget")):
            return None
        state = saved["budget"]
        calibration = Calibration(*state["calibration"], eval_every=eval_every)
        budget = cls(state["seconds"], calibration, plan, dist, clock, state.get("compiled", False))
        # a state saved before --eval-every has 3 figures: its evaluation's held the end's log and checkpoint, as planned then
        budget.speed = Calibration(*state["speed"], eval_every=eval_every)
        budget.after_eval, budget.replans = state["after_eval"], state["replans"]
        return budget


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a GPU, so that a clock read next counts it (a CPU's work is done when queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate(step: Callable, evaluate: Callable, loader, steps_per_epoch: int, dist: DistInfo, device: torch.device,
              seconds_wanted: float = MIN_TIMED_SECONDS) -> Timing:
    """Seconds per step (after WARMUP_STEPS untimed ones, timed for `seconds_wanted`) and of one evaluation, on the
    run's own parts: `step(x, y)` one optimizer step, `evaluate()` one epoch's evaluation. Under torchrun every rank
    steps (DDP's collectives need them all) and the slowest rank's times count, so every rank takes the same steps."""

    def timed(n: int) -> tuple[int, float]:  # up to n steps from the loader's position: how many, how long
        if loader.batch >= steps_per_epoch:
            loader.set_epoch(loader.epoch + 1)
        start, done = time.perf_counter(), 0
        for x, y in itertools.islice(loader, min(n, steps_per_epoch - loader.batch)):
            step(x, y)
            done += 1
        synchronize(device)
        return done, all_reduce_max([time.perf_counter() - start], dist)[0]

    loader.set_epoch(0)
    warmup_steps, warmup_seconds = timed(WARMUP_STEPS)  # a compiled step compiles here
    steps, seconds = 0, 0.0
    while steps < MIN_TIMED_STEPS or seconds < seconds_wanted:
        done, spent = timed(5)
        steps, seconds = steps + done, seconds + spent
    start = time.perf_counter()
    evaluate()
    synchronize(device)
    (eval_seconds,) = all_reduce_max([time.perf_counter() - start], dist)
    return Timing(seconds / steps, eval_seconds, warmup_seconds, warmup_steps)


def plan_budget(cfg: TrainConfig, dist: DistInfo, device: torch.device, timed: Callable[[bool, float], Timing],
                steps_per_epoch: int, clock: RunClock, out=print) -> TimeBudget:
    """Calibrate (every rank takes part): `timed(compiled, seconds)` times the eager or compiled step (`calibrate`),
    as --compile chooses (compiling.choose). Returns the budget with its first plan (the run then starts over),
    less any compilation paid; its `compiled` says whether the step is compiled."""
    asked = parse_duration(cfg.time_budget)
    choice = choose(cfg, dist, device, asked, lambda compiled: timed(compiled, timed_seconds(asked)))
    budget = asked - choice.charged
    cal = Calibration(choice.timing.seconds_per_step, choice.timing.eval_seconds, cfg.batch_size, eval_every=cfg.eval_every)
    plan = first_plan(budget, cfg, steps_per_epoch, cal)  # the same on every rank
    if choice.line:
        out(choice.line)
    if plan.total_steps < plan.steps_per_epoch:
        out(f"time budget {cfg.time_budget} is shorter than one epoch here: training {plan.total_steps} of its "
            f"{plan.steps_per_epoch} steps, then one evaluation")
    paid = f" ({budget:.0f}s left after {choice.charged:.0f}s of compiling)" if choice.charged else ""
    every = {0: " (evaluating after the last epoch only)", 1: ""}.get(cfg.eval_every, f" (evaluating every {cfg.eval_every} epochs)")
    out(
        f"time budget {cfg.time_budget}{paid}: {cal.images_per_sec:.0f} images/s and {cal.eval_seconds:.1f}s per evaluation "
        f"measured{every}, so {plan.total_steps} steps ({plan.total_steps / plan.steps_per_epoch:.2f} epochs) to start with; "
        f"the run re-plans from its own progress every {CHECK_SHARE:.1%} of its steps and at each epoch end"
    )
    return TimeBudget(budget, cal, plan, dist, clock, choice.compiled)
