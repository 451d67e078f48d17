"""The training state: what `last.state.pt` holds (each object through its own state_dict), loading it
back for an exact resume, and the save rules (state, then last, then EMA, then best if it improved).
`State` is mixed into the Trainer.
"""

from __future__ import annotations

from pathlib import Path

from ..budget import RunClock, TimeBudget
from ..checkpoint import rank_state, save_state, save_weights
from ..distributed import gather_objects
from ..system import PRECISION_NAMES, rng_state, set_rng_state
from .runlog import EpochEval, StepStats
from .stopping import Stopped, resume_command


class State:
    """Saving and loading the Trainer's full state."""

    def _state(self, epoch: int, ranks: list[dict]) -> dict:
        return {
            "format": 2,
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "world_size": self.dist.world_size,
            "ranks": ranks,  # each rank's loader position and random streams, in rank order
            "device_type": self.device.type,
            "precision": PRECISION_NAMES[self.amp_dtype],
            "process": self.process,  # the profile's TF32 / cudnn.benchmark, applied again on resume
            "epoch_progress": vars(self.epoch_so_far) if self.epoch_so_far is not None else None,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.log.history,
            "classes": self.data.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "model_args": self.model_args,
            "plan": self.plan.state_dict(),  # the run's length (a time budget's as re-planned so far)
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "spent_seconds": self.clock.spent(),  # a resumed time budget spends only what is left
        }

    def _rank_state(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "rng": rng_state()}

    def _load_state(self, state: dict, run_dir: Path) -> None:
        if state["model_args"]["num_classes"] != self.data.num_classes:
            raise ValueError(f"{run_dir} was trained on {state['model_args']['num_classes']} classes, this data has {self.data.num_classes}")
        self.model.load_state_dict(state["model"])
        saved = state["optimizer"]
        kernels = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in self.optimizer.param_groups]
        # this device's kernels, not the saving run's (a GPU's fused=True on a CPU), set before loading: torch
        # places each 'step' counter for the kernels of its group (fused: on the parameter's device)
        groups = [{**group, **mine} for group, mine in zip(saved["param_groups"], kernels)]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        mine = rank_state(state, self.dist.rank)
        same_device = state.get("device_type", self.device.type) == self.device.type
        self.train_loader.load_state_dict(mine["loader"], generator=same_device)  # else re-seeded (epoch start)
        set_rng_state(mine["rng"])
        self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
        # The learning rate is a pure function of the step, so the schedule needs no saved state.
        self.scheduler.step_update(num_updates=self.step)
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        self.log.history = list(state["history"])
        self.resumed_mid_epoch = self.train_loader.batch > 0
        if state.get("epoch_progress") and self.resumed_mid_epoch:
            self.epoch_so_far = StepStats(**state["epoch_progress"])
        self.clock = RunClock(state.get("spent_seconds", self._spent_before()))
        if state.get("plan") and state.get("budget"):  # before the closed loop a resumed budget run kept its plan
            self.budget = TimeBudget.from_state(state["budget"], self.plan, self.dist, self.clock)
        where = f"epoch {self.start_epoch + 1}" + (f", batch {self.train_loader.batch + 1}" if self.resumed_mid_epoch else "")
        moved = "" if same_device else f" (saved on {state['device_type']}: not bit-identical to staying there)"
        self.out(f"resumed {run_dir} at {where} (step {self.step}){moved}")

    def _spent_before(self) -> float:
        """A state saved before the run's clock was: its last epoch's elapsed seconds and the steps after them."""
        spent = self.log.history[-1]["elapsed_seconds"] if self.log.history else 0.0
        return spent + (self.epoch_so_far.seconds if self.epoch_so_far is not None else 0.0)

    def _plan_meta(self) -> dict | None:
        """The length a time budget chose, for the weights' metadata (export's recipe and model card read it)."""
        return {"epochs": self.plan.epochs, "total_steps": self.plan.total_steps} if self.budget is not None else None

    def save_last(self, epoch: int) -> None:
        """State, then last weights, then EMA weights (before best): each file replaced atomically.
        Every rank takes part (each contributes its own random streams); rank 0 writes."""
        ranks = gather_objects(self._rank_state(), self.dist)
        if not self.dist.is_main:
            return
        save_state(self.dirs.checkpoints / "last.state.pt", self._state(epoch, ranks))
        last = self.log.history[-1] if self.log.history else {}
        meta = self.meta.at(epoch, plan=self._plan_meta(), test_accuracy=last.get("test_acc"))
        save_weights(self.dirs.checkpoints / "last.safetensors", self.model.state_dict(), meta)
        if self.ema is not None:
            ema_meta = self.meta.at(epoch, ema=True, plan=self._plan_meta(), test_accuracy=last.get("ema_test_acc"))
            save_weights(self.dirs.checkpoints / "ema.safetensors", self.ema.module.state_dict(), ema_meta)

    def checkpoint_epoch(self, epoch: int, ev: EpochEval) -> None:
        """The state and last weights, then best.safetensors if the chosen split improved (raw or EMA,
        whichever is better on val). A kill between the two leaves a resumable state. The loader must stand at
        the next epoch's start (the state saved is "start of the next epoch")."""
        chosen, key, split = (ev.val, "val", "validation") if ev.val is not None else (ev.test, "test", "test")
        weights, test = self.model, ev.test
        if ev.ema_val is not None and ev.ema_val.accuracy > ev.val.accuracy:  # judged on val only, never on test
            chosen, weights, test = ev.ema_val, self.ema.module, ev.ema_test
        improved = chosen.accuracy > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = chosen.accuracy, epoch + 1
        self.save_last(epoch + 1)
        if improved and self.dist.is_main:
            accuracies = {f"{key}_accuracy": chosen.accuracy, "test_accuracy": test.accuracy}
            meta = self.meta.at(epoch + 1, ema=weights is not self.model, selected_on=split, plan=self._plan_meta(), **accuracies)
            save_weights(self.dirs.checkpoints / "best.safetensors", weights.state_dict(), meta)

    def _save_and_stop(self, epoch: int) -> None:
        """A stop was agreed: save everything, then leave with the signal's exit status."""
        self.save_last(epoch)
        self.log.close()
        message = (f"stopped: saved {self.dirs.checkpoints}/last.state.pt at step {self.step}; continue with "
                   f"{resume_command(self.dist)} --resume {self.dirs.checkpoints}")
        self.out(message)
        raise Stopped(message, self.stop.exit_code)
