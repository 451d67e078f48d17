"""The run log: the console lines, metrics.csv, TensorBoard, the figures and the final report; inert on
ranks other than 0. `RunLog` is given the values it writes: it reads nothing of the Trainer.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import TrainConfig
from ..distributed import DistInfo
from ..evaluation import EpochEval, EvalResult
from ..fileio import atomic_write
from ..plots import augmented_grid, training_curves


@dataclass
class RunDirs:
    name: str
    checkpoints: Path
    logs: Path
    figures: Path

    @classmethod
    def of(cls, cfg: TrainConfig) -> RunDirs:
        name = cfg.run_name
        return cls(name, Path(cfg.checkpoint_dir) / name, Path(cfg.log_dir) / name, Path(cfg.fig_dir) / name)


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
    """What a run writes and prints: rank 0 only (other ranks get an inert one)."""

    def __init__(self, cfg: TrainConfig, dirs: RunDirs, dist: DistInfo, out, classes: list[str]):
        self.cfg, self.dirs, self.dist, self.out, self.classes = cfg, dirs, dist, out, classes
        self.history: list[dict] = []  # one row per epoch, as metrics.csv has them (a resume carries them on)
        self.writer = NullWriter()  # TensorBoard's SummaryWriter once opened on rank 0

    def open(self, step: int) -> None:
        """Rank 0 writes the config and opens the TensorBoard log (a resumed run purges what followed `step`)."""
        if not self.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter  # noqa: I001  (lazy: TensorBoard is heavy; rank 0 only)

        self.write_config()
        self.writer = SummaryWriter(str(self.dirs.logs), purge_step=step if step else None)

    def augmented_batch(self, loader, mixup, data) -> None:
        """figures/augmented_batch.png (rank 0, unless --no-figures): a batch as the model sees it."""
        if self.dist.is_main and self.cfg.figures:
            augmented_batch(self.cfg, loader, mixup, data.mean, data.std, data.classes, self.dirs.figures / "augmented_batch.png")

    def epoch_row(self, epoch: int, step: int, lr: float, stats: StepStats, ev: EpochEval | None, spent: float, budget: dict,
                  eval_seconds: float = 0.0) -> dict:
        """One row of metrics.csv, and the same figures in TensorBoard (epoch_seconds: training steps only;
        eval_seconds: this epoch's evaluation; elapsed_seconds: the run's training seconds so far). `ev` None: the
        epoch was not evaluated (--eval-every), its test columns stay empty."""
        test = ev.test if ev is not None else None
        row = {
            "epoch": epoch + 1, "step": step, "lr": lr, "train_loss": round(stats.loss, 6),
            "test_loss": round(test.loss, 6) if test else None, "test_acc": round(test.accuracy, 4) if test else None,
            "images_per_sec": round(stats.images / max(stats.seconds, 1e-9), 1),
            "epoch_seconds": round(stats.seconds, 2), "eval_seconds": round(eval_seconds, 2),
            # wall time of steps, evaluations, logs and checkpoints (across resumes): what "time to accuracy" means
            "elapsed_seconds": round(spent, 2),
        }
        if ev is not None:
            row.update(self._evaluated(ev))
        row.update(budget)
        self._write_scalars(row, step, stats, ev, budget)
        self.history.append(row)
        return row

    @staticmethod
    def _evaluated(ev: EpochEval) -> dict:
        """The validation and EMA columns of an evaluated epoch (those it has)."""
        row = {}
        if ev.val is not None:
            row.update(val_loss=round(ev.val.loss, 6), val_acc=round(ev.val.accuracy, 4))
        if ev.ema_test is not None:
            row["ema_test_acc"] = round(ev.ema_test.accuracy, 4)
        if ev.ema_val is not None:
            row["ema_val_acc"] = round(ev.ema_val.accuracy, 4)
        return row

    def close_row(self, spent: float) -> None:
        """After the checkpoint: the epoch's row counts it (elapsed_seconds), and goes into metrics.csv."""
        row = self.history[-1]
        row["elapsed_seconds"] = round(spent, 2)
        if "budget_spent_pct" in row:
            row["budget_spent_pct"] = round(100 * row["elapsed_seconds"] / row["time_budget_s"], 2)
        if self.dist.is_main:
            self._write_csv()

    def loss(self, value: float, lr: float, step: int, of: str, bar) -> None:
        """A logging interval's mean loss: TensorBoard, the bar, or without one (a log file) a plain line."""
        self.writer.add_scalar("train/loss", value, step)
        self.writer.add_scalar("train/lr", lr, step)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.4f}")
        if bar.disable:
            self.out(f"  step {step}/{of}: loss {value:.4f}, lr {lr:.5f}")

    def _write_scalars(self, row: dict, step: int, stats: StepStats, ev: EpochEval | None, budget: dict) -> None:
        w = self.writer
        scalars = {"train/epoch_loss": stats.loss, "train/lr": row["lr"]}
        scalars.update({"perf/images_per_sec": row["images_per_sec"], "perf/epoch_seconds": stats.seconds})
        scalars.update({f"budget/{key}": value for key, value in budget.items()})
        if ev is not None:
            scalars.update(self._evaluated_scalars(ev))
        for tag, value in scalars.items():
            w.add_scalar(tag, value, step)
        w.flush()

    def _evaluated_scalars(self, ev: EpochEval) -> dict:
        scalars = {"test/loss": ev.test.loss, "test/accuracy": ev.test.accuracy}
        scalars.update({f"test_per_class/{c}": acc for c, acc in zip(self.classes, ev.test.per_class)})
        if ev.val is not None:
            scalars.update({"val/loss": ev.val.loss, "val/accuracy": ev.val.accuracy})
        if ev.ema_test is not None:
            scalars["test/ema_accuracy"] = ev.ema_test.accuracy
        if ev.ema_val is not None:
            scalars["val/ema_accuracy"] = ev.ema_val.accuracy
        return scalars

    def print_epoch(self, epoch: int, epochs: int, row: dict, ev: EpochEval | None) -> None:
        if ev is None:
            self.out(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f} (not evaluated: --eval-every "
                     f"{self.cfg.eval_every}), {row['images_per_sec']:.0f} img/s, {row['epoch_seconds']:.1f}s")
            return
        extra = f", val {ev.val.accuracy:.2f}%" if ev.val is not None else ""
        extra += f", EMA test acc {ev.ema_test.accuracy:.2f}%" if ev.ema_test is not None else ""
        self.out(
            f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, test loss {ev.test.loss:.4f}, "
            f"test acc {ev.test.accuracy:.2f}%{extra}, {row['images_per_sec']:.0f} img/s, {row['epoch_seconds']:.1f}s"
        )

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

    def write_curves(self) -> Path | None:
        if not self.history or not self.dist.is_main or not self.cfg.figures:
            return None
        return training_curves(self.history, self.dirs.figures / "training_curves.png", title=self.dirs.name)

    def close(self) -> None:
        """On the way out (the end, or a stop): the curves drawn, TensorBoard flushed and closed."""
        self.writer.close()
        self.write_curves()

    def report(self, final: EvalResult, tta: float | None, best: tuple[float, int], split: str) -> dict:
        """The end of the run: final accuracy (and TTA's beside it), per class, the best checkpoint, where things are."""
        self.out(f"\nfinal test accuracy: {final.accuracy:.2f}% ({final.correct}/{final.total}), test loss {final.loss:.4f}")
        if tta is not None:
            self.out(f"with {self.cfg.tta} TTA: {tta:.2f}% (the plain figure above is the headline)")
        self.out("per-class test accuracy:\n" + final.per_class_table(self.classes))
        self.out(f"best: {best[0]:.2f}% on the {split} split at epoch {best[1]}")
        self.out(f"checkpoints: {self.dirs.checkpoints}/ (best.safetensors, last.safetensors, last.state.pt)")
        self.out(f"tensorboard: tensorboard --logdir={self.cfg.log_dir}/   (run {self.dirs.name})")
        figures = f"{self.dirs.figures}/training_curves.png" if self.cfg.figures else "none (--no-figures)"
        self.out(f"figures:     {figures}; metrics: {self.dirs.logs}/metrics.csv")
        return {"run": self.dirs.name, "checkpoint_dir": self.dirs.checkpoints, "log_dir": self.dirs.logs, "figure_dir": self.dirs.figures,
                "final": final, "tta_accuracy": tta, "best_metric": best[0], "best_epoch": best[1], "history": self.history}


def augmented_batch(cfg: TrainConfig, loader, mixup, mean, std, classes: list[str], path: Path) -> Path:
    """What the model sees, drawn without touching any RNG the training run uses."""
    np_state = np.random.get_state()  # timm's Mixup draws from numpy's global RNG
    mix_prob = mixup.mix_prob
    try:
        n = min(32, len(loader.labels)) // 2 * 2  # Mixup pairs images: an even count
        pick = torch.randperm(len(loader.labels), generator=torch.Generator().manual_seed(cfg.seed))[:n].to(loader.device)
        g = torch.Generator(device=loader.device).manual_seed(cfg.seed + 12345)
        x = loader.transform(loader.images[pick], g)
        mixup.mix_prob = 1.0  # show the mixing itself, which the run applies to mix_prob of its batches
        x, target = mixup(x, loader.labels[pick])
    finally:
        mixup.mix_prob = mix_prob
        np.random.set_state(np_state)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    title = "Augmented training images with their targets" + (
        f" (MixUp/CutMix shown; the run mixes {100 * mix_prob:.0f}% of batches)" if cfg.mixing else ""
    )
    return augmented_grid(x.float() * std + mean, target, classes, path, title)

