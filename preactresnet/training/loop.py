"""The training loop, top to bottom: `Trainer.from_config` resolves the run once and builds its parts (parts.py); `fit`
runs the epochs: steps (`train_steps` -> step.train_step), evaluate, log (RunLog), checkpoint (Checkpointer), stop?"""

from __future__ import annotations

import itertools
import time

import torch
from tqdm.auto import tqdm

from ..budget import RunClock, TimeBudget, Timing, calibrate, plan_budget, synchronize
from ..config import ResolvedConfig, TrainConfig
from ..data import num_classes_of
from ..distributed import DistInfo, init_distributed, sum_over_ranks
from ..evaluation import EpochEval, EvalResult, EvaluationStopped, evaluate_epoch
from ..inference import final_scores
from ..plan import RunPlan
from ..precision import resolve_precision
from .parts import build_data, build_network, build_step_parts, setup_process, startup_lines, sync_debug, use_channels_last, weights_meta
from .resolve import resolve_config
from .runlog import RunDirs, RunLog, StepStats, _silent
from .state import Checkpointer, Resumed, resumed_line, resumed_meta, run_record, starting_point
from ..step import train_step
from .stopping import StopControl, Stopped, check_finite, stop_message


class Trainer:
    """Everything one run needs, built from a finished config; `fit()` trains it."""

    def __init__(self, resolved: ResolvedConfig, dist: DistInfo | None = None, out=print, command: str = ""):
        self.cfg, self.command = resolved.cfg, command
        self.dist = dist or DistInfo()
        self.out = out if self.dist.is_main else _silent
        saved = resolved.state or {}
        self.startup = setup_process(self.cfg, self.dist, resolved.profile, saved.get("process"), self.out)
        self.dirs = RunDirs.of(self.cfg)
        self.data, self.loaders = build_data(self.cfg, self.dist, self.startup)  # the dataset; its loaders
        self.plan = RunPlan.of(self.cfg, self.loaders.steps_per_epoch, saved=saved.get("plan"))  # a resumed budget's as saved
        self.net = build_network(self.cfg, self.dist, self.startup, self.data, resolved.state is None, self.out)
        self.meta = resumed_meta(weights_meta(self.cfg, command, self.data, self.net.model_args, self.dirs.name, self.startup.device), resolved)
        self.step_parts = build_step_parts(self.cfg, self.dist, self.startup, self.net, self.data.num_classes, self.plan)
        self.checkpointer = Checkpointer(self.dirs, self.dist, self.meta, self.step_parts, self.loaders.train)
        self.clock = RunClock()  # the seconds this run has spent training (a resume carries them on)
        self.budget: TimeBudget | None = None  # --time-budget's closed loop (calibrate_budget, or the resumed state)
        self.precision_line = resolved.precision_line  # why --amp/--muon-ns-dtype auto chose what it did
        self.log = RunLog(self.cfg, self.dirs, self.dist, self.out, self.data.classes)  # console, metrics.csv, TensorBoard
        self.stop, self.start_epoch, self.step = StopControl(self.dist), 0, 0
        self.epoch_so_far: StepStats | None = None  # the current epoch's steps before a mid-epoch resume
        self.no_bars = None if self.cfg.progress and self.dist.is_main else True  # tqdm's disable: None = on a terminal only
        if resolved.state is not None:
            self._resume(resolved.state, resolved.run_dir)

    @classmethod
    def from_config(cls, cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> Trainer:
        """Start the process group (under torchrun), resolve the config once, build the trainer."""
        dist = init_distributed(cfg.device)
        resolved = resolve_config(cfg, explicit or {}, dist, warn=out if dist.is_main else _silent)
        resolved = resolve_precision(resolved, dist, num_classes_of(resolved.cfg.dataset), use_channels_last(resolved.cfg))
        trainer = cls(resolved, dist, out=out, command=command)
        if resolved.cfg.time_budget and not resolved.cfg.total_steps and resolved.state is None:
            trainer.calibrate_budget()  # times steps on itself, then starts over with the first plan
        return trainer

    def calibrate_budget(self) -> None:
        """--time-budget: time real steps and an evaluation, eager or compiled as --compile chooses (budget.plan_budget),
        then start over from the state the trainer was built in, with the first plan and fresh optimization parts."""
        start, eager = starting_point(self.net.model, self.loaders.train), self.net
        self.budget = plan_budget(self.cfg, self.dist, self.startup.device, self._timed, self.loaders.steps_per_epoch,
                                  self.clock, self.out)
        self.net, self.plan, self.step = self.net if self.budget.compiled else eager, self.budget.plan, 0  # re-planned as it goes
        start.restore(self.net.model, self.loaders.train)
        self.step_parts = build_step_parts(self.cfg, self.dist, self.startup, self.net, self.data.num_classes, self.plan)
        self.checkpointer = Checkpointer(self.dirs, self.dist, self.meta, self.step_parts, self.loaders.train)

    def _timed(self, compiled: bool, seconds: float) -> Timing:
        """The calibration of the eager or compiled step (budget.calibrate); the run starts over after it."""
        if compiled and not self.net.compiled:
            self.net = self.net.compile(self.out)
            self.step_parts = build_step_parts(self.cfg, self.dist, self.startup, self.net, self.data.num_classes, self.plan)
        self.net.model.train()
        return calibrate(self._step, self.evaluate_epoch, self.loaders.train, self.loaders.steps_per_epoch, self.dist,
                         self.startup.device, seconds)

    def fit(self) -> dict:
        for line in startup_lines(self.cfg, self.data.summary(), self.startup, self.loaders.steps_per_epoch, self.plan,
                                  self.budget is not None, self.precision_line, self.loaders.val is not None, self.dist):
            self.out(line)
        self.log.augmented_batch(self.loaders.train, self.step_parts.mixup, self.data)  # figures/augmented_batch.png
        self.log.open(self.step)
        epoch, final = self.start_epoch, None
        epochs = tqdm(desc="epochs", disable=self.no_bars, initial=epoch, total=self.plan.epochs)
        sync_debug(self.cfg, self.startup.device, self.out)
        self.clock.start()  # the run's clock starts at its first step; a resumed time budget says what is left of it
        if self.budget is not None and (line := self.budget.start(self.step, self.cfg.time_budget)):
            self.out(line)
        try:
            with self.stop:
                while epoch < self.plan.epochs:  # read after each epoch: a time budget's re-plan may change it
                    final = self.run_epoch(epoch)
                    epoch, epochs.total = epoch + 1, self.plan.epochs
                    epochs.update(1)
                    epochs.set_postfix(test_acc=f"{final.accuracy:.2f}" if final else "-")
        finally:
            epochs.close()
            sync_debug(self.cfg, self.startup.device, self.out, on=False)
        self.log.close()
        final, tta = final_scores(self.net.model, self.loaders.test, self.cfg.tta, self.data.num_classes,
                                  self.startup.amp_dtype, self.net.all_reduce, final)  # a finished run resumed: evaluated now
        return self.log.report(final, tta, (self.checkpointer.best_metric, self.checkpointer.best_epoch),
                               "validation" if self.loaders.val is not None else "test")

    def run_epoch(self, epoch: int) -> EvalResult | None:
        """Train what is left of `epoch`, then evaluate (None if --eval-every skips it), log, checkpoint; its test result."""
        if self.loaders.train.batch == 0:  # else resumed in the middle of `epoch`
            self.loaders.train.set_epoch(epoch)
        if self.stop.agree_now(self.startup.device, self.net.all_reduce):  # a signal during the last epoch's end
            self._save_and_stop(epoch, self.epoch_so_far)
        self.step_parts.mixup.mixup_enabled = self.cfg.mixing and epoch < self.plan.epochs - self.cfg.mix_off_epochs
        stats = self.train_steps(self.loaders.steps_per_epoch - self.loaders.train.batch, epoch)  # fewer at the plan's end
        stats, self.epoch_so_far = (self.epoch_so_far + stats if self.epoch_so_far is not None else stats), None
        if self.stop.requested:
            self._save_and_stop(epoch, stats)
        eval_start, evaluates = time.perf_counter(), self.plan.evaluates(epoch + 1, self.cfg.eval_every)
        try:
            results = self.evaluate_epoch() if evaluates else None  # --eval-every skips some epochs
        except EvaluationStopped:  # saved as "the epoch's steps done": a resume evaluates it again
            self._save_and_stop(epoch, stats)
        eval_seconds = time.perf_counter() - eval_start if evaluates else None
        self._check_budget(epoch + 1, eval_seconds, epoch_end=True)  # re-plan from the epoch's steps and evaluation
        row = self.log.epoch_row(epoch, self.step, self.step_parts.optimizer.param_groups[0]["lr"], stats, results,
                                 self.clock.spent(), self.budget.record() if self.budget is not None else {}, eval_seconds or 0.0)
        self.loaders.train.set_epoch(epoch + 1)  # the state saved is "start of the next epoch"
        self.checkpointer.save_epoch(epoch + 1, results, run_record(self), self.budget and self.budget.length())
        if self.budget is not None:  # the log and checkpoint count toward the time too
            self.budget.pause(time.perf_counter() - eval_start - (eval_seconds or 0.0))
        self.log.close_row(self.clock.spent())
        self.log.print_epoch(epoch, self.plan.epochs, row, results)
        return results and results.test

    def train_steps(self, n: int, epoch: int = 0) -> StepStats:
        """Up to `n` optimizer steps from the loader's position (fewer at the plan's end or a stop). Host syncs: one per
        --log-interval steps and one at the end; between them torchrun's ranks compare stop flags (StopControl.poll)."""
        self.net.model.train()
        bar = tqdm(total=min(n, self.plan.total_steps - self.step), desc=f"epoch {epoch + 1}/{self.plan.epochs}",
                   leave=False, disable=self.no_bars)
        loss_sum, count, start = torch.zeros((), device=self.startup.device), 0, time.perf_counter()
        logged_sum, logged_count = loss_sum.clone(), 0  # where the last logging interval ended
        for count, (x, y) in enumerate(itertools.islice(self.loaders.train, n * (self.step < self.plan.total_steps)), 1):  # none after the plan's end
            loss_sum += self._step(x, y)
            bar.update(1)
            if self.step % self.cfg.log_interval == 0:
                if self._log_window((loss_sum - logged_sum) / (count - logged_count), epoch, bar):
                    break
                logged_sum, logged_count = loss_sum.clone(), count
            elif self.stop.poll():
                break
            if self.budget is not None and self.budget.due(self.step):
                self._check_budget(epoch, bar=bar)
            if self.step >= self.plan.total_steps:
                break
        # the stretch's mean loss and stop flags over all ranks in one all-reduce (read once), its seconds
        device = self.startup.device
        loss_total, steps_total, stop = sum_over_ranks(self.net.all_reduce, loss_sum, torch.full((), float(count), device=device),
                                                       self.stop.flag(device))
        self.stop.agreed(stop)  # under torchrun: any rank's, so every rank leaves the epoch alike
        synchronize(device)
        seconds, mean = time.perf_counter() - start, loss_total / max(steps_total, 1)
        bar.close()
        check_finite(mean, epoch, self.step, self.dirs.checkpoints)
        return StepStats(mean, seconds, count * self.cfg.batch_size * self.dist.world_size, count)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch (step.train_step); returns the (detached) loss without synchronizing."""
        loss, self.step = train_step(self.step_parts, x, y, self.step + 1), self.step + 1  # self.step: steps done
        return loss

    def _log_window(self, mean: torch.Tensor, epoch: int, bar) -> bool:
        """Log the mean loss since the last log; whether to stop now (one all-reduce: every rank decides alike)."""
        total, stop = sum_over_ranks(self.net.all_reduce, mean, self.stop.flag(self.startup.device))  # the interval's one sync
        check_finite(total / self.dist.world_size, epoch, self.step, self.dirs.checkpoints)
        lr, planned = self.step_parts.optimizer.param_groups[0]["lr"], f"{self.plan.total_steps} (epoch {epoch + 1})"
        self.log.loss(total / self.dist.world_size, lr, self.step, planned, bar)
        return self.stop.agreed(stop)

    def evaluate_epoch(self) -> EpochEval:
        """Test (and validation) accuracy of the model and its EMA, stopping within a batch when asked."""
        loaders, p = (self.loaders.test, self.loaders.val), self.step_parts
        return evaluate_epoch(self.net.model, p.ema, loaders, p.num_classes, self.startup.amp_dtype, self.net.all_reduce,
                              [self.stop.before_batches(loader) for loader in loaders], self.dist)

    def _save_and_stop(self, epoch: int, so_far: StepStats | None = None) -> None:
        """A stop was agreed: save everything (`so_far`: the epoch's steps done), then leave with the signal's status."""
        self.epoch_so_far = so_far
        self.checkpointer.save_last(epoch, run_record(self), self.budget and self.budget.length())
        self.log.close()
        self.out(message := stop_message(self.dirs.checkpoints, self.step, self.dist))
        raise Stopped(message, self.stop.exit_code)

    def _resume(self, state: dict, run_dir) -> None:
        same_device = self.checkpointer.load(state, self.startup.device.type, self.data.classes, self.loaders.steps_per_epoch, run_dir)
        r = Resumed.of(state, mid_epoch=self.loaders.train.batch > 0)
        self.start_epoch, self.step, self.epoch_so_far, self.clock = r.start_epoch, r.step, r.epoch_so_far, RunClock(r.spent_seconds)
        self.log.history = r.history
        self.step_parts.scheduler.step_update(num_updates=self.step)  # the rate is a pure function of the step: no saved state
        self.budget = TimeBudget.from_state(state, self.plan, self.dist, self.clock, self.cfg.eval_every)
        self.out(resumed_line(state, run_dir, r, self.loaders.train.batch, same_device) + self.checkpointer.mended)

    def _check_budget(self, ended: int, eval_seconds: float | None = None, bar=None, epoch_end: bool = False) -> None:
        """--time-budget: re-plan from the progress since the last check (`ended`: epochs ended so far)."""
        if self.budget is None or not (line := self.budget.check(self.step, ended, eval_seconds, self.startup.device, epoch_end)):
            return
        self.out(line)
        if bar is not None:  # the epoch's bar counts to the plan's end, as re-planned
            bar.total = bar.n + min(self.loaders.steps_per_epoch * (ended + 1), self.plan.total_steps) - self.step


def train(cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> dict:
    return Trainer.from_config(cfg, explicit, out=out, command=command).fit()
