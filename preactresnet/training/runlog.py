"""The run log: the console lines, metrics.csv, TensorBoard, the figures and the final report; inert on
ranks other than 0. `RunLog` is mixed into the Trainer.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..evaluation import EvalResult
from ..fileio import atomic_write
from ..inference import tta_accuracy
from ..plots import augmented_grid, training_curves
from ..system import process_age


@dataclass
class StepStats:
    """What `train_steps` did: mean training loss over all ranks, seconds (synchronized), images seen by
    all ranks, optimizer steps."""

    loss: float
    seconds: float
    images: int
    steps: int = 0

    def __add__(self, other: StepStats) -> StepStats:
        """Two stretches of one epoch (before and after a mid-epoch resume) as one."""
        steps = self.steps + other.steps
        loss = (self.loss * self.steps + other.loss * other.steps) / max(steps, 1)
        return StepStats(loss, self.seconds + other.seconds, self.images + other.images, steps)


@dataclass
class EpochEval:
    test: EvalResult
    val: EvalResult | None = None
    ema_test: EvalResult | None = None
    ema_val: EvalResult | None = None


def _silent(*args, **kwargs) -> None:
    pass


class NullWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0 and in benchmarks."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """What the Trainer writes and prints."""

    def log_epoch(self, epoch: int, stats: StepStats, ev: EpochEval, eval_seconds: float = 0.0) -> dict:
        """One row of metrics.csv, and the same figures in TensorBoard (epoch_seconds: training steps only;
        eval_seconds: this epoch's evaluation; elapsed_seconds: the run's training seconds so far)."""
        row = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": round(stats.loss, 6),
            "test_loss": round(ev.test.loss, 6),
            "test_acc": round(ev.test.accuracy, 4),
            "images_per_sec": round(stats.images / max(stats.seconds, 1e-9), 1),
            "epoch_seconds": round(stats.seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            # wall time of steps, evaluations, logs and checkpoints (across resumes): what "time to accuracy" means
            "elapsed_seconds": round(self.clock.spent(), 2),
        }
        if ev.val is not None:
            row.update(val_loss=round(ev.val.loss, 6), val_acc=round(ev.val.accuracy, 4))
        if ev.ema_test is not None:
            row["ema_test_acc"] = round(ev.ema_test.accuracy, 4)
        if ev.ema_val is not None:
            row["ema_val_acc"] = round(ev.ema_val.accuracy, 4)
        budget = self.budget.record() if self.budget is not None else {}
        row.update(budget)
        self._write_scalars(row, stats, ev, budget)
        self.history.append(row)
        return row

    def close_row(self, seconds: float) -> None:
        """After the checkpoint: the epoch's row counts it (elapsed_seconds), and goes into metrics.csv; the budget
        learns what the log and checkpoint cost (`seconds`)."""
        if self.budget is not None:
            self.budget.pause(seconds)
        row = self.history[-1]
        row["elapsed_seconds"] = round(self.clock.spent(), 2)
        if "budget_spent_pct" in row:
            row["budget_spent_pct"] = round(100 * row["elapsed_seconds"] / row["time_budget_s"], 2)
        if self.dist.is_main:
            self._write_csv()

    def _write_scalars(self, row: dict, stats: StepStats, ev: EpochEval, budget: dict) -> None:
        w, step = self.writer, self.step
        w.add_scalar("train/epoch_loss", stats.loss, step)
        w.add_scalar("train/lr", row["lr"], step)
        w.add_scalar("test/loss", ev.test.loss, step)
        w.add_scalar("test/accuracy", ev.test.accuracy, step)
        for c, acc in zip(self.data.classes, ev.test.per_class):
            w.add_scalar(f"test_per_class/{c}", acc, step)
        w.add_scalar("perf/images_per_sec", row["images_per_sec"], step)
        w.add_scalar("perf/epoch_seconds", stats.seconds, step)
        for key, value in budget.items():
            w.add_scalar(f"budget/{key}", value, step)
        if ev.val is not None:
            w.add_scalar("val/loss", ev.val.loss, step)
            w.add_scalar("val/accuracy", ev.val.accuracy, step)
        if ev.ema_test is not None:
            w.add_scalar("test/ema_accuracy", ev.ema_test.accuracy, step)
        if ev.ema_val is not None:
            w.add_scalar("val/ema_accuracy", ev.ema_val.accuracy, step)
        w.flush()

    def _print_epoch(self, epoch: int, row: dict, ev: EpochEval) -> None:
        extra = f", val {ev.val.accuracy:.2f}%" if ev.val is not None else ""
        extra += f", EMA test acc {ev.ema_test.accuracy:.2f}%" if ev.ema_test is not None else ""
        self.out(
            f"epoch {epoch + 1}/{self.plan.epochs}: train loss {row['train_loss']:.4f}, test loss {ev.test.loss:.4f}, "
            f"test acc {ev.test.accuracy:.2f}%{extra}, {row['images_per_sec']:.0f} img/s, {row['epoch_seconds']:.1f}s"
        )

    def _announce(self) -> None:
        cfg = self.cfg
        self.out("config:\n" + cfg.format())
        self.out(self.data.summary())
        self.out(
            f"device {self.device}, precision {self.amp_dtype or torch.float32}, channels_last {self.channels_last}, "
            f"{self.steps_per_epoch} steps/epoch x {self.plan.epochs} epochs"
            + (f" ({self.plan.total_steps} steps in all)" if self.plan.total_steps % self.steps_per_epoch else "")
            + (" to start with: --time-budget re-plans them as it goes" if self.budget is not None else "")
        )
        if self.precision_line:
            self.out(self.precision_line)
        selection = "validation split" if self.val_loader is not None else "TEST set (no --val-size given)"
        self.out(f"best checkpoint chosen on the {selection}")
        if self.dist.enabled:
            self.out(f"distributed: {self.dist.world_size} processes, global batch {cfg.batch_size * self.dist.world_size}, "
                     f"lr {cfg.lr * self.lr_scale:g}")
        age = process_age()
        if age is not None:
            self.out(f"start-up: {age:.1f}s since the process began (imports, data, model, precision timing, budget calibration)")

    def _open_outputs(self) -> None:
        """Rank 0 writes the config, a grid of augmented images and the TensorBoard log."""
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter  # noqa: I001  (lazy: TensorBoard is heavy; rank 0 only)

        self.write_config()
        if self.cfg.figures:
            self._write_augmented_grid()
        self.writer = SummaryWriter(str(self.dirs.logs), purge_step=self.step if self.step else None)

    def write_config(self) -> None:
        """checkpoints/<run>/config.yaml: the run's resolved settings (a time budget's length is in the weights' metadata)."""
        if not self.dist.is_main:
            return
        self.dirs.checkpoints.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write(self.dirs.checkpoints / "config.yaml", lambda tmp: tmp.write_text(text))

    def _write_csv(self) -> None:
        self.dirs.logs.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in self.history for k in row))
        with open(self.dirs.logs / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)

    def _write_augmented_grid(self) -> Path:
        """What the model sees, drawn without touching any RNG the training run uses."""
        np_state = np.random.get_state()  # timm's Mixup draws from numpy's global RNG
        mix_prob = self.mixup.mix_prob
        try:
            n = min(32, len(self.train_loader.labels)) // 2 * 2  # Mixup pairs images: an even count
            pick = torch.randperm(len(self.train_loader.labels), generator=torch.Generator().manual_seed(self.cfg.seed))[:n]
            pick = pick.to(self.device)
            g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 12345)
            x = self.train_loader.transform(self.train_loader.images[pick], g)
            self.mixup.mix_prob = 1.0  # show the mixing itself, which the run applies to mix_prob of its batches
            x, target = self.mixup(x, self.train_loader.labels[pick])
        finally:
            self.mixup.mix_prob = mix_prob
            np.random.set_state(np_state)
        mean = torch.tensor(self.data.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.data.std, device=x.device).view(1, 3, 1, 1)
        title = "Augmented training images with their targets" + (
            f" (MixUp/CutMix shown; the run mixes {100 * mix_prob:.0f}% of batches)" if self.cfg.mixing else ""
        )
        return augmented_grid(x.float() * std + mean, target, self.data.classes, self.dirs.figures / "augmented_batch.png", title)

    def _write_curves(self) -> Path | None:
        if not self.history or not self.dist.is_main or not self.cfg.figures:
            return None
        return training_curves(self.history, self.dirs.figures / "training_curves.png", title=self.dirs.name)

    def _report(self, final: EvalResult) -> dict:
        split = "validation" if self.val_loader is not None else "test"
        self.out(f"\nfinal test accuracy: {final.accuracy:.2f}% ({final.correct}/{final.total}), test loss {final.loss:.4f}")
        tta = None if self.cfg.tta == "none" else tta_accuracy(
            self.model, self.test_loader, self.cfg.tta, self.data.num_classes, self.amp_dtype, self.all_reduce)
        if tta is not None:
            self.out(f"with {self.cfg.tta} TTA: {tta:.2f}% (the plain figure above is the headline)")
        self.out("per-class test accuracy:\n" + final.per_class_table(self.data.classes))
        self.out(f"best: {self.best_metric:.2f}% on the {split} split at epoch {self.best_epoch}")
        self.out(f"checkpoints: {self.dirs.checkpoints}/ (best.safetensors, last.safetensors, last.state.pt)")
        self.out(f"tensorboard: tensorboard --logdir={self.cfg.log_dir}/   (run {self.dirs.name})")
        figures = f"{self.dirs.figures}/training_curves.png" if self.cfg.figures else "none (--no-figures)"
        self.out(f"figures:     {figures}; metrics: {self.dirs.logs}/metrics.csv")
        return {
            "run": self.dirs.name,
            "checkpoint_dir": self.dirs.checkpoints,
            "log_dir": self.dirs.logs,
            "figure_dir": self.dirs.figures,
            "final": final,
            "tta_accuracy": tta,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }
