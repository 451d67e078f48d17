"""Building a run's parts from its finished config, in a fixed order: the process (seeds, threads, device,
precision), the data and loaders, the model (whitened or pretrained start, DDP, compile), the optimization
(optimizer, schedule, MixUp/CutMix, loss, gradient scaler, EMA). `Parts` is mixed into the Trainer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

from ..budget import TimeBudget, plan_budget
from ..checkpoint import WeightsMeta, portable_path
from ..config import TrainConfig, parse_duration
from ..data import BatchAugment, TensorLoader, load_dataset
from ..distributed import all_reduce_sum, wait_for_data
from ..hub import load_pretrained_into
from ..models import create_model
from ..optim import FUSED_KERNELS, build_ema, build_mixup, build_optimizer, build_scheduler, fused_refusal
from ..plan import RunPlan
from ..system import (
    apply_process_settings, machine_description, process_age, resolve_amp, resolve_device, rng_state, seed_everything, set_deterministic, set_rng_state, tune_malloc,
)
from ..whitening import whiten_stem_
from .runlog import RunDirs, _silent
from .state import Checkpointer
from .step import StepParts


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


class Parts:
    """The Trainer's construction, one method per part."""

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
        if self.dist.enabled and self.device.type == "cuda":  # under torchrun each rank takes its own GPU
            self.device = resolve_device("cuda")
        # Linear scaling rule (Goyal et al. 2017): the global batch grew world_size times. The config
        # keeps the unscaled values (a resume must use the same world size: training.resolve._check_resumable).
        self.lr_scale = self.dist.world_size if self.dist.enabled and cfg.scale_lr else 1
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.channels_last = use_channels_last(cfg)

    def _build_data(self, saved_plan: dict | None = None) -> None:
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
        check_total_steps(cfg.total_steps, cfg.epochs, self.steps_per_epoch)
        # the run's length: the config's, or a resumed time budget's plan as it was saved
        self.plan = RunPlan.from_state(saved_plan) if saved_plan else RunPlan.of(cfg, self.steps_per_epoch)

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
        self.train_module, self.all_reduce = self.model, None  # what a step calls; how counts are summed over ranks
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Broadcasts rank 0's weights; gradients live in the all-reduce buckets (no copy in and out).
            self.train_module = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
            seed_everything(cfg.seed + self.dist.rank)  # different dropout masks on each rank
            self.all_reduce = all_reduce_sum
        if cfg.compile:
            self.train_module = torch.compile(self.train_module)

    def _build_optimization(self) -> None:
        cfg = self.cfg
        self.optimizer = build_optimizer(cfg, self.model, self.lr_scale)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plan, self.lr_scale)
        self.mixup = build_mixup(cfg, self.data.num_classes)
        self.criterion = SoftTargetCrossEntropy()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = build_ema(cfg, self.model)
        self.checkpointer = Checkpointer(self.dirs, self.dist, self.meta, self.model, self.optimizer, self.scaler, self.ema,
                                         self.train_loader)
        self.step_parts = StepParts(
            self.model, self.train_module, self.optimizer, self.scaler, self.scheduler, self.ema, self.mixup, self.criterion,
            self.data.num_classes, cfg.label_smoothing, self.device, self.amp_dtype, cfg.grad_clip, not self.dist.enabled,
        )

    def _weights_meta(self) -> WeightsMeta:
        """What every weights file says about itself; data paths relative, never this machine's absolute ones."""
        cfg, source = self.cfg, portable_path(str(self.data.source))
        command = self.command.replace(cfg.data_dir, portable_path(cfg.data_dir)) if cfg.data_dir else self.command
        return WeightsMeta(
            model=cfg.model, model_args=self.model_args, classes=self.data.classes, mean=list(self.data.mean),
            std=list(self.data.std), dataset=cfg.dataset, run=self.dirs.name, data_dir=portable_path(cfg.data_dir, name_only=False),
            data_description=f"{cfg.dataset} test split ({len(self.data.test_labels)} images from {source})",
            command=command, seed=cfg.seed, machine=machine_description(self.device),
        )

    def calibrate_budget(self) -> None:
        """--time-budget: time real steps on this trainer, then start it over from the state it was built in with
        the first plan (a fresh optimizer, schedule, scaler and EMA); the run re-plans from there (TimeBudget)."""
        start = {"model": {k: v.clone() for k, v in self.model.state_dict().items()},
                 "loader": self.train_loader.state_dict(), "rng": rng_state()}
        out, self.out = self.out, _silent  # the calibration's steps print nothing
        self.plan = RunPlan(self.steps_per_epoch, 2**62, 0)  # calibration: steps without an end
        try:
            self.plan, calibration = plan_budget(self, out)
        finally:
            self.out = out
        self.model.load_state_dict(start["model"])
        self.train_loader.load_state_dict(start["loader"])
        set_rng_state(start["rng"])
        self.step = 0
        self.stop.restart()
        self.budget = TimeBudget(parse_duration(self.cfg.time_budget), calibration, self.plan, self.dist, self.clock)
        self._build_optimization()

    def _start_clock(self) -> None:
        """The run's clock starts at its first step; a resumed time budget says what is left of it."""
        self.clock.start()
        if self.budget is None:
            return
        self.budget.start(self.step)
        if 0 < self.step < self.plan.total_steps:  # resumed before its end (a finished run only evaluates)
            spent, whole = self.clock.spent(), self.budget.seconds
            self.out(f"time budget {self.cfg.time_budget}: {spent:.1f}s of {whole:.0f}s spent before the stop, "
                     f"{max(whole - spent, 0):.1f}s left; {self.plan.total_steps - self.step} steps planned, re-planned as it goes")

    def _check_budget(self, ended: int, eval_seconds: float | None = None, bar=None) -> None:
        """--time-budget: measure the progress since the last check and re-plan if the budget's end moved;
        `ended`: the epochs ended so far, `eval_seconds`: the evaluation of the epoch just ended."""
        if self.budget is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock must count the work queued so far
        line = self.budget.check(self.step, ended, eval_seconds)
        if line:
            self.out(line)
            if bar is not None:
                bar.total = bar.n + min(self.steps_per_epoch * (ended + 1), self.plan.total_steps) - self.step
                bar.refresh()


def startup_lines(cfg: TrainConfig, data_summary: str, device, amp_dtype, channels_last: bool, steps_per_epoch: int,
                  plan: RunPlan, budgeted: bool, precision_line: str | None, validated: bool, dist, lr_scale: float) -> list[str]:
    """What a run prints before its first step: config, data, device and precision, length, selection, start-up."""
    lines = ["config:\n" + cfg.format(), data_summary,
             f"device {device}, precision {amp_dtype or torch.float32}, channels_last {channels_last}, "
             f"{steps_per_epoch} steps/epoch x {plan.epochs} epochs"
             + (f" ({plan.total_steps} steps in all)" if plan.total_steps % steps_per_epoch else "")
             + (" to start with: --time-budget re-plans them as it goes" if budgeted else "")]
    lines += [precision_line] if precision_line else []
    refused = fused_refusal(cfg.optimizer, device) if device.type == "cuda" and cfg.optimizer in FUSED_KERNELS else None
    lines += [f"torch {torch.__version__} refuses fused {cfg.optimizer} on {device} ({refused}): its foreach kernels instead"] if refused else []
    lines.append(f"best checkpoint chosen on the {'validation split' if validated else 'TEST set (no --val-size given)'}")
    if dist.enabled:
        lines.append(f"distributed: {dist.world_size} processes, global batch {cfg.batch_size * dist.world_size}, lr {cfg.lr * lr_scale:g}")
    age = process_age()
    if age is not None:
        lines.append(f"start-up: {age:.1f}s since the process began (imports, data, model, precision timing, budget calibration)")
    return lines


def sync_debug(cfg: TrainConfig, device: torch.device, out) -> None:
    """--sync-debug: CUDA warns at each host synchronization (logging, epoch ends and checkpoints have some)."""
    if not cfg.sync_debug:
        return
    if device.type != "cuda":
        out("--sync-debug watches CUDA only; on this device count the calls with python bench/sync_count.py")
        return
    torch.cuda.set_sync_debug_mode("warn")
    out("--sync-debug: a warning marks each host synchronization; a clean step has none between log lines")
