"""The training loop: build the parts, then epochs of steps, each followed by evaluate, log, checkpoint.
`Trainer.from_config` resolves the run once (resolve.py, precision, the time budget's first plan), `fit` runs the
epochs, `train_steps` the steps, `_step` one step. Building (parts.py), saving (state.py), logging (runlog.py)
and stopping (stopping.py) live beside it."""

from __future__ import annotations

import itertools
import time

import torch
from tqdm.auto import tqdm

from ..budget import RunClock, TimeBudget
from ..config import ResolvedConfig, TrainConfig
from .resolve import resolve_config
from ..distributed import DistInfo, init_distributed
from ..evaluation import EpochEval, EvalResult, EvaluationStopped, evaluate, evaluate_epoch
from ..inference import tta_accuracy
from ..precision import resolve_precision
from .parts import Parts, startup_lines, sync_debug, use_channels_last
from .runlog import RunDirs, RunLog, StepStats, _silent, augmented_batch
from .state import Checkpointer, Resumed, run_record
from .step import train_step
from .stopping import StopControl, Stopped, check_finite, resume_command


class Trainer(Parts):
    """Everything one run needs, built from a finished config; `fit()` trains it."""

    def __init__(self, resolved: ResolvedConfig, dist: DistInfo | None = None, out=print, command: str = ""):
        self.cfg, self.command = resolved.cfg, command
        self.dist = dist or DistInfo()
        self.out = out if self.dist.is_main else _silent
        saved = resolved.state or {}
        self._setup_process(resolved.profile, saved.get("process"))
        self.dirs = RunDirs.of(self.cfg)
        self._build_data(saved.get("plan"))
        self._build_model(fresh=resolved.state is None)
        self.meta = self._weights_meta()
        self.checkpointer: Checkpointer  # made with the optimization it saves
        self._build_optimization()
        self.clock = RunClock()  # the seconds this run has spent training (a resume carries them on)
        self.budget: TimeBudget | None = None  # --time-budget's closed loop (calibrate_budget, or the resumed state)
        self.precision_line = (resolved.precision or {}).get("line")  # why --amp/--muon-ns-dtype auto chose what it did
        self.log = RunLog(self.cfg, self.dirs, self.dist, self.out, self.data.classes)  # console, metrics.csv, TensorBoard
        self.stop, self.start_epoch, self.step = StopControl(self.dist), 0, 0
        self.best_metric, self.best_epoch, self.resumed_mid_epoch = -1.0, -1, False
        self.epoch_so_far: StepStats | None = None  # the current epoch's steps before a mid-epoch resume
        if resolved.state is not None:
            self._load_state(resolved.state, resolved.run_dir)

    @classmethod
    def from_config(cls, cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> Trainer:
        """Start the process group (under torchrun), resolve the config once, build the trainer."""
        dist = init_distributed(cfg.device)
        resolved = resolve_config(cfg, explicit or {}, dist, warn=out if dist.is_main else _silent)
        num_classes = 100 if resolved.cfg.dataset == "cifar100" else 10
        resolved = resolve_precision(resolved, dist, num_classes, use_channels_last(resolved.cfg))
        trainer = cls(resolved, dist, out=out, command=command)
        if resolved.cfg.time_budget and not resolved.cfg.total_steps and resolved.state is None:
            trainer.calibrate_budget()  # times steps on itself, then starts over with the first plan
        return trainer

    @property
    def _no_bars(self) -> bool | None:  # tqdm's `disable`: None draws bars on a terminal only, never into a log file
        return None if self.cfg.progress and self.dist.is_main else True

    def fit(self) -> dict:
        for line in startup_lines(self.cfg, self.data.summary(), self.device, self.amp_dtype, self.channels_last,
                                  self.steps_per_epoch, self.plan, self.budget is not None, self.precision_line,
                                  self.val_loader is not None, self.dist, self.lr_scale):
            self.out(line)
        if self.dist.is_main and self.cfg.figures:
            augmented_batch(self.cfg, self.train_loader, self.mixup, self.data.mean, self.data.std, self.data.classes,
                            self.dirs.figures / "augmented_batch.png")
        self.log.open(self.step)
        epoch, final = self.start_epoch, None
        epochs = tqdm(desc="epochs", disable=self._no_bars, initial=epoch, total=self.plan.epochs)
        sync_debug(self.cfg, self.device, self.out)
        self._start_clock()
        try:
            with self.stop:
                while epoch < self.plan.epochs:  # read after each epoch: a time budget's re-plan may change it
                    final = self.run_epoch(epoch)
                    epoch += 1
                    epochs.total = self.plan.epochs
                    epochs.update(1)
                    epochs.set_postfix(test_acc=f"{final.accuracy:.2f}")
        finally:
            epochs.close()
            if self.cfg.sync_debug and self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)  # the process may go on (a notebook, the tests): no warnings left on
        self.log.close()
        k, amp = self.data.num_classes, self.amp_dtype
        if final is None:  # resumed a finished run
            final = evaluate(self.model, self.test_loader, k, amp, self.all_reduce)
        tta = None if self.cfg.tta == "none" else tta_accuracy(self.model, self.test_loader, self.cfg.tta, k, amp, self.all_reduce)
        split = "validation" if self.val_loader is not None else "test"
        return self.log.report(final, tta, (self.best_metric, self.best_epoch), split)

    def run_epoch(self, epoch: int) -> EvalResult:
        """Train what is left of `epoch`, then evaluate, log and checkpoint; returns the test result."""
        if not self.resumed_mid_epoch:
            self.train_loader.set_epoch(epoch)
        self.resumed_mid_epoch = False
        if self.dist.enabled:  # a signal during the last epoch's end, on any rank
            self.stop.agreed(self._over_ranks(self.stop.flag(self.device))[0])
        if self.stop.requested:
            self._save_and_stop(epoch)
        self.mixup.mixup_enabled = self.cfg.mixing and epoch < self.plan.epochs - self.cfg.mix_off_epochs
        stats = self.train_steps(self.steps_per_epoch - self.train_loader.batch, epoch)  # ends early at the plan's end
        if self.epoch_so_far is not None:
            stats, self.epoch_so_far = self.epoch_so_far + stats, None
        if self.stop.requested:
            self.epoch_so_far = stats
            self._save_and_stop(epoch)
        eval_start = time.perf_counter()
        try:
            results = self.evaluate_epoch()
        except EvaluationStopped:  # saved as "the epoch's steps done": a resume evaluates it again
            self.epoch_so_far, self.stop.requested = stats, True
            self._save_and_stop(epoch)
        eval_seconds = time.perf_counter() - eval_start
        self._check_budget(epoch + 1, eval_seconds)  # re-plan from the epoch's measured steps and evaluation
        budget = self.budget.record() if self.budget is not None else {}
        row = self.log.epoch_row(epoch, self.step, self.optimizer.param_groups[0]["lr"], stats, results, self.clock.spent(),
                                 budget, eval_seconds)
        self.train_loader.set_epoch(epoch + 1)  # the state saved is "start of the next epoch"
        self.checkpoint_epoch(epoch, results)
        if self.budget is not None:  # the log and checkpoint count toward the time too
            self.budget.pause(time.perf_counter() - eval_start - eval_seconds)
        self.log.close_row(self.clock.spent())
        self.log.print_epoch(epoch, self.plan.epochs, row, results)
        return results.test

    def train_steps(self, n: int, epoch: int = 0) -> StepStats:
        """Up to `n` optimizer steps from the loader's current position (fewer at the plan's end or a stop).

        Host synchronizations: one per --log-interval steps (the logged loss, and under torchrun the stop
        flags) and one at the end. Between them torchrun's ranks compare stop flags about once a second
        (host values through gloo, no GPU synchronization), so every rank stops at the same step, soon.
        """
        self.model.train()
        bar = tqdm(total=min(n, self.plan.total_steps - self.step), desc=f"epoch {epoch + 1}/{self.plan.epochs}",
                   leave=False, disable=self._no_bars)
        loss_sum, count, start = torch.zeros((), device=self.device), 0, time.perf_counter()
        logged_sum, logged_count = loss_sum.clone(), 0  # where the last logging interval ended
        for x, y in itertools.islice(self.train_loader, n):
            loss_sum += self._step(x, y)
            count += 1
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
        return self._steps_done(loss_sum, count, start, epoch, bar)

    def _steps_done(self, loss_sum: torch.Tensor, count: int, start: float, epoch: int, bar) -> StepStats:
        """The stretch's mean loss and stop flags over all ranks in one all-reduce (read once), its seconds."""
        steps_here = torch.full((), float(count), device=self.device)
        loss_total, steps_total, stop = self._over_ranks(loss_sum, steps_here, self.stop.flag(self.device))
        self.stop.agreed(stop)  # under torchrun: any rank's, so every rank leaves the epoch alike
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        mean_loss = loss_total / max(steps_total, 1)
        check_finite(self, mean_loss, epoch)
        return StepStats(mean_loss, seconds, count * self.cfg.batch_size * self.dist.world_size, count)

    def _over_ranks(self, *values: torch.Tensor) -> list[float]:  # summed over the ranks in one all-reduce, read once
        summed = torch.stack([v.float() for v in values])
        if self.all_reduce is not None:
            self.all_reduce(summed)
        return summed.tolist()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch (step.train_step); returns the (detached) loss without synchronizing."""
        loss = train_step(self.step_parts, x, y, self.step + 1)
        self.step += 1
        return loss

    def _log_window(self, mean: torch.Tensor, epoch: int, bar) -> bool:
        """Log the mean loss since the last log (over all ranks); returns whether to stop now.

        Under torchrun the loss and the stop flag travel in one all-reduce: every rank sees the same
        non-finite loss and the same decision, so no rank waits in a collective for one that left.
        """
        total, stop = self._over_ranks(mean, self.stop.flag(self.device))  # the one synchronization of the logging interval
        value = total / self.dist.world_size
        check_finite(self, value, epoch)
        self.log.loss(value, self.optimizer.param_groups[0]["lr"], self.step, f"{self.plan.total_steps} (epoch {epoch + 1})", bar)
        return self.stop.agreed(stop)

    def checkpoint_epoch(self, epoch: int, ev: EpochEval) -> None:
        """The state and last weights, then best.safetensors if the chosen split improved: a kill between the two
        leaves a resumable state. The loader stands at the next epoch's start (the state is the next epoch's start)."""
        accuracy, weights, accuracies, split = self.checkpointer.judge(ev)
        improved = accuracy > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = accuracy, epoch + 1
        self.checkpointer.save_last(epoch + 1, run_record(self), self._plan_meta())
        if improved:
            self.checkpointer.save_best(epoch + 1, weights, accuracies, split, self._plan_meta())

    def _save_and_stop(self, epoch: int) -> None:
        """A stop was agreed: save everything, then leave with the signal's exit status."""
        self.checkpointer.save_last(epoch, run_record(self), self._plan_meta())
        self.log.close()
        message = (f"stopped: saved {self.dirs.checkpoints}/last.state.pt at step {self.step}; continue with "
                   f"{resume_command(self.dist)} --resume {self.dirs.checkpoints}")
        self.out(message)
        raise Stopped(message, self.stop.exit_code)

    def _plan_meta(self) -> dict | None:
        """The length a time budget chose, for the weights' metadata (export's recipe and model card read it)."""
        return {"epochs": self.plan.epochs, "total_steps": self.plan.total_steps} if self.budget is not None else None

    def _load_state(self, state: dict, run_dir) -> None:
        if state["model_args"]["num_classes"] != self.data.num_classes:
            raise ValueError(f"{run_dir} was trained on {state['model_args']['num_classes']} classes, this data has {self.data.num_classes}")
        same_device = self.checkpointer.load(state, self.device.type)
        self.resumed_mid_epoch = self.train_loader.batch > 0
        r = Resumed.of(state, self.resumed_mid_epoch)
        self.start_epoch, self.step, self.best_metric, self.best_epoch = r.start_epoch, r.step, r.best_metric, r.best_epoch
        self.log.history, self.epoch_so_far, self.clock = r.history, r.epoch_so_far, RunClock(r.spent_seconds)
        self.scheduler.step_update(num_updates=self.step)  # the rate is a pure function of the step: no saved state
        if state.get("plan") and state.get("budget"):  # before the closed loop a resumed budget run kept its plan
            self.budget = TimeBudget.from_state(state["budget"], self.plan, self.dist, self.clock)
        where = f"epoch {self.start_epoch + 1}" + (f", batch {self.train_loader.batch + 1}" if self.resumed_mid_epoch else "")
        moved = "" if same_device else f" (saved on {state['device_type']}: not bit-identical to staying there)"
        self.out(f"resumed {run_dir} at {where} (step {self.step}){moved}")

    # -- end of an epoch: evaluate, log, checkpoint --------------------------------------------------
    def evaluate_epoch(self) -> EpochEval:
        """Test (and validation) accuracy of the model and its EMA, stopping within a batch when asked."""
        loaders = (self.test_loader, self.val_loader)
        return evaluate_epoch(self.model, self.ema, loaders, self.data.num_classes, self.amp_dtype, self.all_reduce,
                              [self.stop.before_batches(loader) for loader in loaders], self.dist)


def train(cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> dict:
    return Trainer.from_config(cfg, explicit, out=out, command=command).fit()
