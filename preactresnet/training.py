"""The training loop: the spec's recipe, exact resume, atomic checkpoints, TensorBoard, CSV, curves.

`resolve_config` (config.py) finishes the config once; `Trainer` builds data, model and optimization
from it in small steps, then `fit` runs epochs of `train_steps`, each followed by evaluate, log and
checkpoint.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from tqdm.auto import tqdm

from .budget import fit_to_budget
from .checkpoint import WeightsMeta, portable_path, rank_state, save_state, save_weights
from .config import ResolvedConfig, TrainConfig, resolve_config
from .data import BatchAugment, TensorLoader, load_dataset
from .distributed import Agreement, DistInfo, all_reduce_sum, broadcast_buffers, gather_objects, init_distributed, wait_for_data
from .evaluation import EvalResult, evaluate
from .fileio import atomic_write
from .hub import load_pretrained_into
from .inference import predict_probs
from .models import create_model
from .optim import build_ema, build_mixup, build_optimizer, build_scheduler
from .plots import augmented_grid, training_curves
from .precision import resolve_precision
from .system import (
    PRECISION_NAMES,
    apply_process_settings,
    autocast,
    process_age,
    resolve_amp,
    resolve_device,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
    tune_malloc,
)
from .whitening import whiten_stem_

__all__ = [
    "EpochEval", "NonFiniteLoss", "NullWriter", "RunDirs", "StepStats", "StopFlag", "Stopped", "Trainer", "build_mixup",
    "build_optimizer", "build_scheduler", "train",
]


def resume_command(dist: DistInfo, argv0: str | None = None) -> str:
    """How this run was launched, for the resume hint: python train.py, a console script, or torchrun."""
    argv0 = argv0 if argv0 is not None else (sys.argv[0] if sys.argv and sys.argv[0] else "train.py")
    name = Path(argv0).name
    if dist.enabled:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(dist.world_size))
        return f"torchrun --nproc_per_node={per_node} (and this run's other torchrun options) {name}"
    return f"python {name}" if name.endswith(".py") else name


class NonFiniteLoss(Exception):
    pass


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


@dataclass
class EpochEval:
    test: EvalResult
    val: EvalResult | None = None
    ema_test: EvalResult | None = None
    ema_val: EvalResult | None = None


def check_total_steps(total: int, epochs: int, steps_per_epoch: int) -> None:
    """--total-steps must end inside the last epoch: more would stop early with the schedule sized for them
    all, fewer would leave whole epochs without a step."""
    low, high = (epochs - 1) * steps_per_epoch + 1, epochs * steps_per_epoch
    if total and not low <= total <= high:
        fit = math.ceil(total / steps_per_epoch)
        raise ValueError(f"--total-steps {total} does not end in the last of --epochs {epochs} ({steps_per_epoch} steps each "
                         f"here): give --total-steps from {low} to {high}, or --epochs {fit} for {total} steps")


def use_channels_last(cfg: TrainConfig) -> bool:
    if cfg.channels_last != "auto":
        return cfg.channels_last == "on"
    # NHWC is what cuDNN's tensor-core kernels want; on the CPU (oneDNN, fp32) it measured 1.1-1.6x
    # faster for PreActResNet18 and ResNeXt-29 here too (torch 2.14, AVX2), grouped convs included.
    return True


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


class Stopped(KeyboardInterrupt):
    """Training stopped on a signal after saving its full state (a KeyboardInterrupt, as Ctrl-C always
    was); `code` is the exit status to use."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopFlag:
    """SIGTERM (a scheduler's preemption) or the first Ctrl-C: finish the step, save, exit with 128 + the
    signal's number (143 or 130). A second Ctrl-C stops at once; a repeated SIGTERM changes nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.stop = False
        self.signum = signal.SIGTERM
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handler(self, signum, frame):
        if self.stop:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.stop, self.signum = True, signum
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"\n{name}: finishing this step, saving, then exiting{again}", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


class Trainer:
    """Everything one run needs, built from a finished config; `fit()` trains it."""

    def __init__(self, run: ResolvedConfig, dist: DistInfo | None = None, out=print, command: str = ""):
        self.cfg, self.command = run.cfg, command
        self.dist = dist or DistInfo()
        self.out = out if self.dist.is_main else _silent
        self._setup_process(run.profile, (run.state or {}).get("process"))
        self.dirs = RunDirs.of(self.cfg)
        self._build_data()
        self._build_model(fresh=run.state is None)
        self._build_optimization()
        self.meta = self._weights_meta()
        self.budget = run.budget  # --time-budget's calibration and choice, logged with every epoch
        self.precision_line = (run.precision or {}).get("line")  # why --amp/--muon-ns-dtype auto chose what it did
        self.writer, self.stop = NullWriter(), StopFlag()
        self.agreement = Agreement(self.dist)  # when the ranks compare their stop flags
        self.start_epoch, self.step, self.history = 0, 0, []
        self.best_metric, self.best_epoch = -1.0, -1
        self.resumed_mid_epoch = False
        self.carried: StepStats | None = None  # the current epoch's steps before a mid-epoch resume
        if run.state is not None:
            self._load_state(run.state, run.run_dir)

    @classmethod
    def from_config(cls, cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> Trainer:
        """Start the process group (under torchrun), resolve the config once, build the trainer."""
        dist = init_distributed(cfg.device)
        run = resolve_config(cfg, explicit or {}, dist, warn=out if dist.is_main else _silent)
        num_classes = 100 if run.cfg.dataset == "cifar100" else 10
        run = resolve_precision(run, dist, num_classes, use_channels_last(run.cfg))
        if run.cfg.time_budget and not run.cfg.total_steps and run.state is None:
            run, _ = fit_to_budget(cls(run, dist, out=_silent), run, dist, out=out if dist.is_main else _silent)
        return cls(run, dist, out=out, command=command)

    # -- construction -------------------------------------------------------------------------------
    def _setup_process(self, profile: dict | None, saved_process: dict | None) -> None:
        """Process-wide settings: allocator, seeds, determinism, threads, device, precision, and the
        profile's TF32 / cudnn.benchmark (from the profile on a fresh run, from the state on resume)."""
        cfg = self.cfg
        tune_malloc()
        seed_everything(cfg.seed)
        set_deterministic(cfg.deterministic)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.process = apply_process_settings(profile or saved_process or {}, cfg.deterministic)
        if profile is not None:
            applied = ", ".join(f"{k}={v}" for k, v in profile["applied"].items()) or "nothing new"
            self.out(f"using system profile {profile['path']} ({applied}); --profile off ignores it")
        self.device = resolve_device(cfg.device)  # a GPU comes indexed and current (set_device)
        if self.dist.enabled and self.device.type == "cuda":  # under torchrun each rank takes its local GPU
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        # Linear scaling rule (Goyal et al. 2017): the global batch grew world_size times. The config
        # keeps the unscaled values (a resume must use the same world size: config._check_resumable).
        self.lr_scale = self.dist.world_size if self.dist.enabled and cfg.scale_lr else 1
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.channels_last = use_channels_last(cfg)

    def _build_data(self) -> None:
        cfg, shard = self.cfg, dict(rank=self.dist.rank, world_size=self.dist.world_size)
        first_on_node = self.dist.local_rank == 0  # each node builds its own cache: no shared folder assumed
        if not first_on_node:
            wait_for_data(self.dist)  # the node's first process downloads and builds; its neighbours then read
        self.data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, val_size=cfg.val_size, seed=cfg.seed)
        if first_on_node:
            wait_for_data(self.dist)
        dtype, mean, std = self.amp_dtype or torch.float32, self.data.mean, self.data.std
        train_tf = BatchAugment(cfg.augment(), mean, std, dtype, self.channels_last)
        self.train_loader = TensorLoader(
            self.data.train_images, self.data.train_labels, cfg.batch_size, train=True, transform=train_tf,
            device=self.device, seed=cfg.seed, alternate_flip=cfg.alt_flip, **shard,
        )
        eval_tf, eval_batch = BatchAugment(None, mean, std, dtype, self.channels_last), max(cfg.batch_size, 500)
        self.test_loader = TensorLoader(
            self.data.test_images, self.data.test_labels, eval_batch, train=False, transform=eval_tf, device=self.device, **shard
        )
        self.val_loader = None
        if self.data.val_images is not None:
            self.val_loader = TensorLoader(
                self.data.val_images, self.data.val_labels, eval_batch, train=False, transform=eval_tf, device=self.device, **shard
            )
        self.steps_per_epoch = len(self.train_loader)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.total_steps = cfg.total_steps or cfg.epochs * self.steps_per_epoch
        check_total_steps(cfg.total_steps, cfg.epochs, self.steps_per_epoch)

    def _build_model(self, fresh: bool) -> None:
        """The network (pretrained or whitened start on a fresh run), on its device, wrapped for DDP/compile."""
        cfg = self.cfg
        self.model_args = {
            "num_classes": self.data.num_classes, "width_mult": cfg.width_mult,
            "drop_rate": cfg.drop_rate, "zero_init_residual": cfg.zero_init_residual,
        }
        model = create_model(cfg.model, **self.model_args)
        if fresh and cfg.pretrained:
            self.out(load_pretrained_into(model, cfg.model, cfg.pretrained))
        elif fresh and cfg.whiten_stem and self.dist.is_main:  # under torchrun DDP sends rank 0's stem to the others
            whiten_stem_(model, self.data.train_images, self.data.mean, self.data.std, seed=cfg.seed)
        self.model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        if self.dist.enabled and cfg.sync_bn:
            if self.device.type == "cpu":
                raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel; drop --sync-bn")
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.forward, self.reduce = self.model, None  # what a step calls; how counts are summed over ranks
        if self.dist.enabled:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            # Broadcasts rank 0's weights; gradients live in the all-reduce buckets (no copy in and out).
            self.forward = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
            seed_everything(cfg.seed + self.dist.rank)  # different dropout masks on each rank
            self.reduce = all_reduce_sum
        if cfg.compile:
            self.forward = torch.compile(self.forward)

    def _build_optimization(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(cfg, self.model, self.lr_scale)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch, self.lr_scale)
        self.mixup = build_mixup(cfg, self.data.num_classes)
        self.criterion = SoftTargetCrossEntropy()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = build_ema(cfg, self.model)

    def _weights_meta(self) -> WeightsMeta:
        """What every weights file says about itself; data paths relative, never this machine's absolute ones."""
        cfg, source = self.cfg, portable_path(str(self.data.source))
        command = self.command.replace(cfg.data_dir, portable_path(cfg.data_dir)) if cfg.data_dir else self.command
        return WeightsMeta(
            model=cfg.model, model_args=self.model_args, classes=self.data.classes, mean=list(self.data.mean),
            std=list(self.data.std), dataset=cfg.dataset, run=self.dirs.name, data_dir=portable_path(cfg.data_dir, name_only=False),
            data_description=f"{cfg.dataset} test split ({len(self.data.test_labels)} images from {source})",
            command=command,
        )

    # -- state ------------------------------------------------------------------------------------
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
            "epoch_progress": vars(self.carried) if self.carried is not None else None,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "classes": self.data.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "model_args": self.model_args,
            "budget": self.budget,
        }

    def _rank_state(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "rng": rng_state()}

    def _load_state(self, state: dict, run_dir: Path) -> None:
        if state["model_args"]["num_classes"] != self.data.num_classes:
            raise ValueError(f"{run_dir} was trained on {state['model_args']['num_classes']} classes, this data has {self.data.num_classes}")
        self.model.load_state_dict(state["model"])
        built = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, kernels in zip(self.optimizer.param_groups, built):
            group.update(kernels)  # this device's kernels, not the saving run's (a GPU's fused=True on a CPU)
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
        self.history = list(state["history"])
        self.budget = state.get("budget")
        self.resumed_mid_epoch = self.train_loader.batch > 0
        if state.get("epoch_progress") and self.resumed_mid_epoch:
            self.carried = StepStats(**state["epoch_progress"])
        where = f"epoch {self.start_epoch + 1}" + (f", batch {self.train_loader.batch + 1}" if self.resumed_mid_epoch else "")
        moved = "" if same_device else f" (saved on {state['device_type']}: not bit-identical to staying there)"
        self.out(f"resumed {run_dir} at {where} (step {self.step}){moved}")

    def save_last(self, epoch: int) -> None:
        """State, then last weights, then EMA weights (before best): each file replaced atomically.
        Every rank takes part (each contributes its own random streams); rank 0 writes."""
        ranks = gather_objects(self._rank_state(), self.dist)
        if not self.dist.is_main:
            return
        save_state(self.dirs.checkpoints / "last.state.pt", self._state(epoch, ranks))
        last = self.history[-1] if self.history else {}
        meta = self.meta.at(epoch, test_accuracy=last.get("test_acc"))
        save_weights(self.dirs.checkpoints / "last.safetensors", self.model.state_dict(), meta)
        if self.ema is not None:
            ema_meta = self.meta.at(epoch, ema=True, test_accuracy=last.get("ema_test_acc"))
            save_weights(self.dirs.checkpoints / "ema.safetensors", self.ema.module.state_dict(), ema_meta)

    # -- loop -------------------------------------------------------------------------------------
    @property
    def _bars(self) -> bool | None:
        """tqdm's `disable`: None draws bars on a terminal only, never into a log file."""
        return None if self.cfg.progress and self.dist.is_main else True

    def fit(self) -> dict:
        cfg = self.cfg
        self._announce()
        self._open_outputs()
        epochs = tqdm(range(self.start_epoch, cfg.epochs), desc="epochs", disable=self._bars, initial=self.start_epoch, total=cfg.epochs)
        final: EvalResult | None = None
        self._sync_debug()
        try:
            with self.stop:
                for epoch in epochs:
                    final = self.run_epoch(epoch)
                    epochs.set_postfix(test_acc=f"{final.accuracy:.2f}")
        finally:
            if self.cfg.sync_debug and self.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)  # the process may go on (a notebook, the tests): no warnings left on
        self.writer.close()
        self._write_curves()
        if final is None:  # resumed a finished run
            final = evaluate(self.model, self.test_loader, self.data.num_classes, self.amp_dtype, self.reduce)
        return self._report(final)

    def _sync_debug(self) -> None:
        """--sync-debug: CUDA warns at each host synchronization (logging, epoch ends and checkpoints have some)."""
        if not self.cfg.sync_debug:
            return
        if self.device.type != "cuda":
            self.out("--sync-debug watches CUDA only; on this device count the calls with python bench/sync_count.py")
            return
        torch.cuda.set_sync_debug_mode("warn")
        self.out("--sync-debug: a warning marks each host synchronization; a clean step has none between log lines")

    def run_epoch(self, epoch: int) -> EvalResult:
        """Train what is left of `epoch`, then evaluate, log and checkpoint; returns the test result."""
        if not self.resumed_mid_epoch:
            self.train_loader.set_epoch(epoch)
        self.resumed_mid_epoch = False
        if self._agree_stop():  # a signal that came during the last evaluation or checkpoint
            self._save_and_stop(epoch)
        self.mixup.mixup_enabled = self.cfg.mixing and epoch < self.cfg.epochs - self.cfg.mix_off_epochs
        # a resumed epoch began before the stop: its steps then count toward elapsed_seconds too
        epoch_start = time.perf_counter() - (self.carried.seconds if self.carried is not None else 0.0)
        steps = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)  # the last may be partial
        stats = self.train_steps(steps - self.train_loader.batch, epoch)
        if self.carried is not None:
            stats, self.carried = self.carried + stats, None
        if self.stop.stop:
            self.carried = stats
            self._save_and_stop(epoch)
        eval_start = time.perf_counter()
        results = self.evaluate_epoch()
        row = self.log_epoch(epoch, stats, results, epoch_start, eval_seconds=time.perf_counter() - eval_start)
        self.checkpoint_epoch(epoch, results)
        self._print_epoch(epoch, row, results)
        return results.test

    def train_steps(self, n: int, epoch: int = 0) -> StepStats:
        """Up to `n` optimizer steps from the loader's current position (fewer if a stop is agreed).

        Host synchronizations: one per --log-interval steps (the logged loss, and under torchrun the stop
        flags) and one at the end. Between them torchrun's ranks compare stop flags about once a second
        (host values through gloo, no GPU synchronization), so every rank stops at the same step, soon.
        """
        self.model.train()
        bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False, disable=self._bars)
        loss_sum = torch.zeros((), device=self.device)
        window = torch.zeros((), device=self.device)
        count, in_window = 0, 0
        start = time.perf_counter()
        for x, y in itertools.islice(self.train_loader, n):
            loss = self._step(x, y)
            loss_sum += loss
            window += loss
            count, in_window = count + 1, in_window + 1
            bar.update(1)
            if self.step % self.cfg.log_interval == 0:
                if self._log_window(window / in_window, epoch, bar):
                    break
                window.zero_()
                in_window = 0
            elif self.agreement.poll(self.stop.stop):  # at once alone; under torchrun within about a second
                self.stop.stop = True
                break
        steps_here = torch.full((), float(count), device=self.device)
        loss_total, steps_total, stop = self._over_ranks(loss_sum, steps_here, self._stop_flag())
        self.stop.stop = stop > 0  # under torchrun: any rank's, so every rank leaves the epoch alike
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        mean_loss = loss_total / max(steps_total, 1)
        self._check_finite(mean_loss, epoch)
        return StepStats(mean_loss, seconds, count * self.cfg.batch_size * self.dist.world_size, count)

    def _over_ranks(self, *values: torch.Tensor) -> list[float]:
        """Scalars summed over all ranks in one all-reduce (under torchrun), read back in one synchronization."""
        summed = torch.stack([v.float() for v in values])
        if self.reduce is not None:
            self.reduce(summed)
        return summed.tolist()

    def _stop_flag(self) -> torch.Tensor:
        return torch.full((), float(self.stop.stop), device=self.device)

    def _agree_stop(self) -> bool:
        """Whether any rank was asked to stop (under torchrun an all-reduce, so all ranks agree)."""
        if self.dist.enabled:
            self.stop.stop = self._over_ranks(self._stop_flag())[0] > 0
        return self.stop.stop

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns the (detached) loss without synchronizing."""
        if self.mixup.mixup_enabled:
            x, target = self.mixup(x, y)
        else:  # the same smoothed targets, built directly: no even batch needed
            target = mixup_target(y, self.data.num_classes, smoothing=self.cfg.label_smoothing)
        with autocast(self.device, self.amp_dtype):
            logits = self.forward(x)
        loss = self.criterion(logits.float(), target)
        # Under DDP the gradients are views into its all-reduce buckets: zeroed in place, never dropped.
        self.optimizer.zero_grad(set_to_none=not self.dist.enabled)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.scheduler.step_update(num_updates=self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return loss.detach()

    def _log_window(self, mean: torch.Tensor, epoch: int, bar) -> bool:
        """Log the mean loss since the last log (over all ranks); returns whether to stop now.

        Under torchrun the loss and the stop flag travel in one all-reduce: every rank sees the same
        non-finite loss and the same decision, so no rank waits in a collective for one that left.
        """
        total, stop = self._over_ranks(mean, self._stop_flag())  # the one synchronization of the logging interval
        value = total / self.dist.world_size
        self._check_finite(value, epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        self.writer.add_scalar("train/loss", value, self.step)
        self.writer.add_scalar("train/lr", lr, self.step)
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.4f}")
        if bar.disable:  # no bar (a log file, a batch job): a plain line per logging interval instead
            self.out(f"  step {self.step}/{self.total_steps} (epoch {epoch + 1}): loss {value:.4f}, lr {lr:.5f}")
        self.stop.stop = stop > 0
        return self.stop.stop

    def _check_finite(self, value: float, epoch: int) -> None:
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"training loss became {value} in epoch {epoch + 1} (step {self.step}); stopped without saving, "
                f"so {self.dirs.checkpoints}/last.* still holds the last good epoch. Lower --lr or set --grad-clip"
            )

    def _save_and_stop(self, epoch: int) -> None:
        self.save_last(epoch)
        self._write_curves()
        self.writer.close()
        message = (f"stopped: saved {self.dirs.checkpoints}/last.state.pt at step {self.step}; continue with "
                   f"{resume_command(self.dist)} --resume {self.dirs.checkpoints}")
        self.out(message)
        raise Stopped(message, self.stop.exit_code)

    # -- end of an epoch: evaluate, log, checkpoint --------------------------------------------------
    def evaluate_epoch(self) -> EpochEval:
        """Test (and validation) accuracy of the model and, with --ema, of its EMA. Under torchrun every rank
        first takes rank 0's BatchNorm statistics: one model (the one rank 0 saves) scores every shard."""
        k, amp, reduce = self.data.num_classes, self.amp_dtype, self.reduce
        if self.dist.enabled:
            broadcast_buffers(self.model, *([self.ema.module] if self.ema is not None else []))
        result = EpochEval(test=evaluate(self.model, self.test_loader, k, amp, reduce))
        if self.val_loader is not None:
            result.val = evaluate(self.model, self.val_loader, k, amp, reduce)
        if self.ema is not None:
            result.ema_test = evaluate(self.ema.module, self.test_loader, k, amp, reduce)
            if self.val_loader is not None:
                result.ema_val = evaluate(self.ema.module, self.val_loader, k, amp, reduce)
        return result

    def log_epoch(self, epoch: int, stats: StepStats, ev: EpochEval, epoch_start: float, eval_seconds: float = 0.0) -> dict:
        """One row of metrics.csv, and the same figures in TensorBoard (epoch_seconds: training steps only;
        eval_seconds: this epoch's evaluation; elapsed_seconds: wall time since the run began)."""
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
            # wall time since the run began, evaluation included: what "time to accuracy" means
            "elapsed_seconds": round((self.history[-1]["elapsed_seconds"] if self.history else 0.0)
                                     + time.perf_counter() - epoch_start, 2),
        }
        if ev.val is not None:
            row.update(val_loss=round(ev.val.loss, 6), val_acc=round(ev.val.accuracy, 4))
        if ev.ema_test is not None:
            row["ema_test_acc"] = round(ev.ema_test.accuracy, 4)
        if ev.ema_val is not None:
            row["ema_val_acc"] = round(ev.ema_val.accuracy, 4)
        row.update(self.budget or {})
        self._write_scalars(row, stats, ev)
        self.history.append(row)
        if self.dist.is_main:
            self._write_csv()
        return row

    def _write_scalars(self, row: dict, stats: StepStats, ev: EpochEval) -> None:
        w, step = self.writer, self.step
        w.add_scalar("train/epoch_loss", stats.loss, step)
        w.add_scalar("train/lr", row["lr"], step)
        w.add_scalar("test/loss", ev.test.loss, step)
        w.add_scalar("test/accuracy", ev.test.accuracy, step)
        for c, acc in zip(self.data.classes, ev.test.per_class):
            w.add_scalar(f"test_per_class/{c}", acc, step)
        w.add_scalar("perf/images_per_sec", row["images_per_sec"], step)
        w.add_scalar("perf/epoch_seconds", stats.seconds, step)
        for key, value in (self.budget or {}).items():
            w.add_scalar(f"budget/{key}", value, step)
        if ev.val is not None:
            w.add_scalar("val/loss", ev.val.loss, step)
            w.add_scalar("val/accuracy", ev.val.accuracy, step)
        if ev.ema_test is not None:
            w.add_scalar("test/ema_accuracy", ev.ema_test.accuracy, step)
        if ev.ema_val is not None:
            w.add_scalar("val/ema_accuracy", ev.ema_val.accuracy, step)
        w.flush()

    def checkpoint_epoch(self, epoch: int, ev: EpochEval) -> None:
        """The state and last weights, then best.safetensors if the chosen split improved (raw or EMA,
        whichever is better on val). A kill between the two leaves a resumable state."""
        chosen, key, split = (ev.val, "val", "validation") if ev.val is not None else (ev.test, "test", "test")
        weights, test = self.model, ev.test
        if ev.ema_val is not None and ev.ema_val.accuracy > ev.val.accuracy:  # judged on val only, never on test
            chosen, weights, test = ev.ema_val, self.ema.module, ev.ema_test
        improved = chosen.accuracy > self.best_metric
        if improved:
            self.best_metric, self.best_epoch = chosen.accuracy, epoch + 1
        self.train_loader.set_epoch(epoch + 1)  # the state saved is "start of the next epoch"
        self.save_last(epoch + 1)
        if improved and self.dist.is_main:
            accuracies = {f"{key}_accuracy": chosen.accuracy, "test_accuracy": test.accuracy}
            meta = self.meta.at(epoch + 1, ema=weights is not self.model, selected_on=split, **accuracies)
            save_weights(self.dirs.checkpoints / "best.safetensors", weights.state_dict(), meta)

    def _print_epoch(self, epoch: int, row: dict, ev: EpochEval) -> None:
        extra = f", val {ev.val.accuracy:.2f}%" if ev.val is not None else ""
        extra += f", EMA test acc {ev.ema_test.accuracy:.2f}%" if ev.ema_test is not None else ""
        self.out(
            f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {row['train_loss']:.4f}, test loss {ev.test.loss:.4f}, "
            f"test acc {ev.test.accuracy:.2f}%{extra}, {row['images_per_sec']:.0f} img/s, {row['epoch_seconds']:.1f}s"
        )

    # -- outputs ------------------------------------------------------------------------------------
    def _announce(self) -> None:
        cfg = self.cfg
        self.out("config:\n" + cfg.format())
        self.out(self.data.summary())
        self.out(
            f"device {self.device}, precision {self.amp_dtype or torch.float32}, channels_last {self.channels_last}, "
            f"{self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs"
            + (f" ({self.total_steps} steps in all)" if self.total_steps != cfg.epochs * self.steps_per_epoch else "")
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

        self.dirs.checkpoints.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        atomic_write(self.dirs.checkpoints / "config.yaml", lambda tmp: tmp.write_text(text))
        self._write_augmented_grid()
        self.writer = SummaryWriter(str(self.dirs.logs), purge_step=self.step if self.step else None)

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
        if not self.history or not self.dist.is_main:
            return None
        return training_curves(self.history, self.dirs.figures / "training_curves.png", title=self.dirs.name)

    def tta_accuracy(self) -> float | None:
        """The final model's test accuracy averaged over the --tta views (None with --tta none)."""
        if self.cfg.tta == "none":
            return None
        probs, labels = predict_probs(self.model, self.test_loader, self.cfg.tta, self.amp_dtype)
        counts = torch.tensor([(probs.argmax(dim=1) == labels).sum().item(), len(labels)], dtype=torch.float64, device=self.device)
        if self.reduce is not None:
            self.reduce(counts)
        return 100.0 * float(counts[0]) / max(float(counts[1]), 1.0)

    def _report(self, final: EvalResult) -> dict:
        split = "validation" if self.val_loader is not None else "test"
        self.out(f"\nfinal test accuracy: {final.accuracy:.2f}% ({final.correct}/{final.total}), test loss {final.loss:.4f}")
        tta = self.tta_accuracy()
        if tta is not None:
            self.out(f"with {self.cfg.tta} TTA: {tta:.2f}% (the plain figure above is the headline)")
        self.out("per-class test accuracy:\n" + final.per_class_table(self.data.classes))
        self.out(f"best: {self.best_metric:.2f}% on the {split} split at epoch {self.best_epoch}")
        self.out(f"checkpoints: {self.dirs.checkpoints}/ (best.safetensors, last.safetensors, last.state.pt)")
        self.out(f"tensorboard: tensorboard --logdir={self.cfg.log_dir}/   (run {self.dirs.name})")
        self.out(f"figures:     {self.dirs.figures}/training_curves.png; metrics: {self.dirs.logs}/metrics.csv")
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


def train(cfg: TrainConfig, explicit: dict | None = None, out=print, command: str = "") -> dict:
    return Trainer.from_config(cfg, explicit, out=out, command=command).fit()
