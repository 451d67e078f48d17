"""--time-budget: the longest schedule that fits a wall-clock budget on this machine.

The budget covers the training steps and the evaluation after each epoch: not the start-up before them
(imports, data, model, precision timing, this calibration) nor what follows the last epoch (TTA, figures,
report). The run's own trainer times a few real training steps (WARMUP_STEPS untimed first, then at least
MIN_TIMED_STEPS and MIN_TIMED_SECONDS, less for a budget under a minute) and one end-of-epoch evaluation (test split, and validation and
EMA where the run has them); from those the number of steps that fit is chosen, written into the config
(epochs and total_steps), and the trainer starts over from the state it was built in (weights, data
position, random streams; a fresh optimizer, schedule and EMA). The calibration steps are
therefore discarded, and a run given the same epochs and total_steps explicitly computes the same numbers.
A few seconds of timing can be 10-15% off on a CPU whose speed drifts, so each epoch that ends inside the
warmup refits the plan from the run's own measured seconds per step and per evaluation (`refit`): the
warmup does not depend on the plan, so the run is still the one those epochs and steps give explicitly.
A resumed run keeps its saved choice and is never calibrated or refitted again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .config import parse_duration
from .distributed import all_reduce_max

WARMUP_STEPS = 3  # first-touch allocations, kernel selection, torch.compile: never timed
MIN_TIMED_STEPS, MIN_TIMED_SECONDS = 5, 3.0  # timed until both are reached, for a stable images/s
CALIBRATION_SHARE = 0.05  # a short budget times for this share of it (at least 1 s): 10 s spends 1 s, not 3


def timed_seconds(budget_seconds: float) -> float:
    """How long calibration times steps: MIN_TIMED_SECONDS, or less for a budget under a minute."""
    return min(MIN_TIMED_SECONDS, max(1.0, CALIBRATION_SHARE * budget_seconds))


@dataclass(frozen=True)
class Calibration:
    seconds_per_step: float
    eval_seconds: float  # one end-of-epoch evaluation (test, validation, EMA) with its checkpoint
    batch_size: int

    @property
    def images_per_sec(self) -> float:
        return self.batch_size / self.seconds_per_step


@dataclass(frozen=True)
class BudgetPlan:
    budget_seconds: float
    epochs: int  # epochs begun, each ending with an evaluation
    total_steps: int
    steps_per_epoch: int
    calibration: Calibration

    @property
    def expected_seconds(self) -> float:
        c = self.calibration
        return self.total_steps * c.seconds_per_step + self.epochs * c.eval_seconds

    def as_record(self) -> dict:
        return {
            "time_budget_s": round(self.budget_seconds, 1),
            "budget_epochs": round(self.total_steps / self.steps_per_epoch, 3),
            "budget_total_steps": self.total_steps,
            "calibrated_images_per_sec": round(self.calibration.images_per_sec, 1),
            "calibrated_eval_seconds": round(self.calibration.eval_seconds, 2),
        }


MIN_STEPS = 5  # a budget that holds fewer steps than this (plus one evaluation) trains nothing worth having


def plan(budget_seconds: float, steps_per_epoch: int, cal: Calibration) -> BudgetPlan:
    """The most steps whose training plus one evaluation per epoch begun fits the budget; shorter than one
    epoch, part of one (only a budget below MIN_STEPS steps and an evaluation is refused)."""
    epoch_seconds = steps_per_epoch * cal.seconds_per_step + cal.eval_seconds
    if budget_seconds < epoch_seconds:
        steps = int((budget_seconds - cal.eval_seconds) / cal.seconds_per_step)
        if steps < MIN_STEPS:
            least = math.ceil(MIN_STEPS * cal.seconds_per_step + cal.eval_seconds)
            raise ValueError(
                f"--time-budget {budget_seconds:g}s holds fewer than {MIN_STEPS} steps here ({cal.images_per_sec:.0f} "
                f"images/s plus {cal.eval_seconds:.1f}s of evaluation); give at least {least}s"
            )
        return BudgetPlan(budget_seconds, 1, min(steps, steps_per_epoch), steps_per_epoch, cal)
    epochs = math.ceil(budget_seconds / epoch_seconds)
    steps = int((budget_seconds - epochs * cal.eval_seconds) / cal.seconds_per_step)
    while steps <= (epochs - 1) * steps_per_epoch:  # the last epoch begun must hold a step
        epochs -= 1
        steps = int((budget_seconds - epochs * cal.eval_seconds) / cal.seconds_per_step)
    steps = min(steps, epochs * steps_per_epoch)
    return BudgetPlan(budget_seconds, epochs, steps, steps_per_epoch, cal)


def refit(budget_seconds: float, steps_per_epoch: int, cal: Calibration, steps_done: int) -> BudgetPlan:
    """The plan again from a speed measured during the run, never ending before the steps already taken."""
    if budget_seconds >= steps_per_epoch * cal.seconds_per_step + cal.eval_seconds:
        fitted = plan(budget_seconds, steps_per_epoch, cal)
        if fitted.total_steps >= steps_done:
            return fitted
    return BudgetPlan(budget_seconds, math.ceil(steps_done / steps_per_epoch), steps_done, steps_per_epoch, cal)


def measured(trainer, stats, eval_seconds: float) -> Calibration:
    """An epoch's own seconds per step and evaluation (under torchrun the slowest rank's, so all plan alike)."""
    per_step, evaluation = all_reduce_max([stats.seconds / max(stats.steps, 1), eval_seconds], trainer.dist)
    return Calibration(per_step, evaluation, trainer.cfg.batch_size)


def calibrate(trainer, seconds_wanted: float = MIN_TIMED_SECONDS) -> Calibration:
    """Time real steps (after WARMUP_STEPS untimed ones, for `seconds_wanted`) and one evaluation on the run's trainer.
    Under torchrun every rank steps (DDP's collectives need them all) and the slowest rank's times count,
    so every rank takes the same number of steps."""
    trainer.train_loader.set_epoch(0)
    trainer.train_steps(WARMUP_STEPS)
    steps, seconds = 0, 0.0
    while steps < MIN_TIMED_STEPS or seconds < seconds_wanted:
        if trainer.train_loader.batch >= trainer.steps_per_epoch:
            trainer.train_loader.set_epoch(trainer.train_loader.epoch + 1)
        stats = trainer.train_steps(min(5, trainer.steps_per_epoch - trainer.train_loader.batch))
        steps, seconds = steps + stats.steps, seconds + all_reduce_max([stats.seconds], trainer.dist)[0]
    start = time.perf_counter()
    trainer.evaluate_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    (eval_seconds,) = all_reduce_max([time.perf_counter() - start], trainer.dist)
    return Calibration(seconds / steps, eval_seconds, trainer.cfg.batch_size)


def fit_to_budget(trainer, out=print) -> BudgetPlan:
    """Calibrate on `trainer` (every rank takes part) and return the plan; the trainer then starts over."""
    cfg = trainer.cfg
    budget = parse_duration(cfg.time_budget)
    choice = plan(budget, trainer.steps_per_epoch, calibrate(trainer, timed_seconds(budget)))  # the same on every rank
    finish = time.strftime("%H:%M:%S", time.localtime(time.time() + choice.expected_seconds))
    if choice.total_steps < choice.steps_per_epoch:
        out(f"time budget {cfg.time_budget} is shorter than one epoch here: training {choice.total_steps} of its "
            f"{choice.steps_per_epoch} steps, then one evaluation")
    out(
        f"time budget {cfg.time_budget}: {choice.calibration.images_per_sec:.0f} images/s and "
        f"{choice.calibration.eval_seconds:.1f}s per evaluation measured, so {choice.total_steps} steps "
        f"({choice.total_steps / choice.steps_per_epoch:.2f} epochs) with warmup and schedule fitted to them; "
        f"expected to finish training at {finish} (the calibration steps are discarded)"
    )
    return choice
