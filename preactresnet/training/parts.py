"""Building a run's parts from its finished config, in a fixed order, each a function returning what it built:
the process (`Startup`: seeds, threads, device, precision, memory format, learning-rate scale), the data
(`Loaders`), the network (`Network`: whitened or pretrained start, DDP, compile) and the optimization
(step.StepParts: optimizer, schedule, MixUp/CutMix, loss, gradient scaler, EMA). The Trainer holds the results.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy

from ..checkpoint import WeightsMeta, portable_path
from ..config import TrainConfig
from ..convgrad import configure as configure_conv_wgrad, ddp_compile_refuses_matmul, use_aten
from ..data import BatchAugment, Dataset, TensorLoader, load_dataset
from ..distributed import DistInfo, all_reduce_sum, wait_for_data
from ..hub import load_pretrained_into
from ..models import create_model
from ..optim import FUSED_KERNELS, build_ema, build_lookahead, build_mixup, build_optimizer, build_scheduler, fused_refusal
from ..plan import RunPlan
from ..system import (
    apply_process_settings, compile_module, machine_description, process_age, resolve_amp, resolve_device, seed_everything, set_deterministic, tune_malloc,
)
from ..whitening import stem_conv, whiten_stem_
from ..step import StepParts


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


@dataclass(frozen=True)
class Startup:
    """What start-up decides once, for every part to read."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    channels_last: bool
    lr_scale: float  # the linear scaling rule's factor under torchrun (1 alone)
    process: dict  # the profile's TF32 / cudnn.benchmark as applied (saved, applied again on resume)


def setup_process(cfg: TrainConfig, dist: DistInfo, profile: dict | None, saved_process: dict | None, out) -> Startup:
    """Process-wide settings: allocator, seeds, determinism, threads, device, precision, and the
    profile's TF32 / cudnn.benchmark (from the profile on a fresh run, from the state on resume)."""
    tune_malloc()
    seed_everything(cfg.seed)
    set_deterministic(cfg.deterministic)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    process = apply_process_settings(profile or saved_process or {}, cfg.deterministic)
    if profile is not None:
        applied = ", ".join(f"{k}={v}" for k, v in profile["applied"].items()) or "nothing new"
        out(f"using system profile {profile['path']} ({applied}); --profile off ignores it")
    device = resolve_device(cfg.device)  # a GPU comes indexed and current (set_device)
    if dist.enabled and device.type == "cuda":  # under torchrun each rank takes its own GPU
        device = resolve_device("cuda")
    # Linear scaling rule (Goyal et al. 2017): the global batch grew world_size times. The config
    # keeps the unscaled values (a resume must use the same world size: training.resolve._check_resumable).
    lr_scale = dist.world_size if dist.enabled and cfg.scale_lr else 1
    return Startup(device, resolve_amp(cfg.amp, device), use_channels_last(cfg), lr_scale, process)


@dataclass(frozen=True)
class Loaders:
    """The run's data on its device: training (this rank's shard), test and (with --val-size) validation."""

    train: TensorLoader
    test: TensorLoader
    val: TensorLoader | None
    steps_per_epoch: int  # the training loader's length, or --max-steps-per-epoch


def build_data(cfg: TrainConfig, dist: DistInfo, startup: Startup) -> tuple[Dataset, Loaders]:
    shard = dict(rank=dist.rank, world_size=dist.world_size)
    first_on_node = dist.local_rank == 0  # each node builds its own cache: no shared folder assumed
    if not first_on_node:
        wait_for_data(dist)  # the node's first process downloads and builds; its neighbours then read
    data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download, val_size=cfg.val_size, seed=cfg.seed)
    if first_on_node:
        wait_for_data(dist)
    dtype, mean, std, device = startup.amp_dtype or torch.float32, data.mean, data.std, startup.device
    train_tf = BatchAugment(cfg.augment(), mean, std, dtype, startup.channels_last)
    train = TensorLoader(data.train_images, data.train_labels, cfg.batch_size, train=True, transform=train_tf,
                         device=device, seed=cfg.seed, alternate_flip=cfg.alt_flip, **shard)
    eval_tf, eval_batch = BatchAugment(None, mean, std, dtype, startup.channels_last), max(cfg.batch_size, 500)
    test = TensorLoader(data.test_images, data.test_labels, eval_batch, train=False, transform=eval_tf, device=device, **shard)
    val = None
    if data.val_images is not None:
        val = TensorLoader(data.val_images, data.val_labels, eval_batch, train=False, transform=eval_tf, device=device, **shard)
    steps_per_epoch = min(len(train), cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else len(train)
    check_total_steps(cfg.total_steps, cfg.epochs, steps_per_epoch)
    return data, Loaders(train, test, val, steps_per_epoch)


@dataclass(frozen=True)
class Network:
    """The model and how a step calls it."""

    model: nn.Module  # the network itself: what is saved, evaluated and followed by the EMA
    train_module: nn.Module  # what a step calls: the model, wrapped for DDP and torch.compile
    all_reduce: Callable | None  # how counts are summed over ranks (None alone)
    model_args: dict  # create_model's arguments, saved with the weights
    compiled: bool = False  # train_module is torch.compile's

    def compile(self, out: Callable[[str], None]) -> Network:
        """The same network with its step compiled (torch.compile, inductor)."""
        ddp = isinstance(self.train_module, nn.parallel.DistributedDataParallel)
        if ddp and ddp_compile_refuses_matmul() and (n := use_aten(self.model)):
            out(f"--conv-wgrad: oneDNN's weight gradients for the {n} convs that had the matmul: torch {torch.__version__}'s "
                "compiled DDP refuses its autograd.Function (DDPOptimizer: 'Found a higher order op')")
        return dataclasses.replace(self, train_module=compile_module(self.train_module), compiled=True)


def freeze_(model: nn.Module, parts: tuple[str, ...]) -> None:
    """--freeze: parameters that never train; on a resumed run too, so the optimizer's groups leave them out as they did."""
    frozen = [stem_conv(model).weight] if "stem" in parts else []
    if "bn-scale" in parts:  # BN -> ReLU -> conv (or the classifier): a scale the next layer's weights already have
        frozen += [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    for param in frozen:
        param.requires_grad_(False)


def build_network(cfg: TrainConfig, dist: DistInfo, startup: Startup, data: Dataset, fresh: bool, out) -> Network:
    """The network (pretrained or whitened start on a fresh run), on its device, wrapped for DDP/compile."""
    model_args = {"num_classes": data.num_classes, "width_mult": cfg.width_mult, "drop_rate": cfg.drop_rate,
                  "zero_init_residual": cfg.zero_init_residual}
    model = create_model(cfg.model, **model_args)
    if fresh and cfg.pretrained:
        out(load_pretrained_into(model, cfg.model, cfg.pretrained))
    elif fresh and cfg.whiten_stem and dist.is_main:  # under torchrun DDP sends rank 0's stem to the others
        whiten_stem_(model, data.train_images, data.mean, data.std, seed=cfg.seed)
    freeze_(model, cfg.frozen)
    layout = torch.channels_last if startup.channels_last else torch.contiguous_format
    model = model.to(startup.device, memory_format=layout)
    if dist.enabled and cfg.sync_bn:
        if startup.device.type == "cpu":
            raise ValueError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU kernel; drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if startup.device.type == "cpu" and cfg.conv_wgrad != "aten":
        out(configure_conv_wgrad(model, cfg.conv_wgrad, tuple(data.train_images.shape[1:]), cfg.batch_size, startup.amp_dtype,
                                 startup.channels_last, dist))
    train_module, all_reduce = model, None
    if dist.enabled:
        ids = [startup.device.index] if startup.device.type == "cuda" else None
        # Broadcasts rank 0's weights; gradients live in the all-reduce buckets (no copy in and out).
        train_module = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        seed_everything(cfg.seed + dist.rank)  # different dropout masks on each rank
        all_reduce = all_reduce_sum
    net = Network(model, train_module, all_reduce, model_args)
    return net.compile(out) if cfg.compile == "on" else net  # "auto": a --time-budget run's calibration chooses


def build_step_parts(cfg: TrainConfig, dist: DistInfo, startup: Startup, net: Network, num_classes: int,
                     plan: RunPlan) -> StepParts:
    """A fresh optimizer, schedule (fitted to `plan`), MixUp/CutMix, loss, gradient scaler, EMA and Lookahead."""
    optimizer = build_optimizer(cfg, net.model, startup.lr_scale)
    return StepParts(
        net.model, net.train_module, optimizer, torch.amp.GradScaler(startup.device.type, enabled=startup.amp_dtype == torch.float16),
        build_scheduler(cfg, optimizer, plan, startup.lr_scale), build_ema(cfg, net.model), build_lookahead(cfg, net.model, plan),
        build_mixup(cfg, num_classes),
        SoftTargetCrossEntropy(), num_classes, cfg.label_smoothing, startup.device, startup.amp_dtype, cfg.grad_clip,
        not dist.enabled,
    )


def weights_meta(cfg: TrainConfig, command: str, data: Dataset, model_args: dict, run_name: str, device) -> WeightsMeta:
    """What every weights file says about itself; data paths relative, never this machine's absolute ones."""
    source = portable_path(str(data.source))
    command = command.replace(cfg.data_dir, portable_path(cfg.data_dir)) if cfg.data_dir else command
    return WeightsMeta(
        model=cfg.model, model_args=model_args, classes=data.classes, mean=list(data.mean), std=list(data.std),
        dataset=cfg.dataset, run=run_name, data_dir=portable_path(cfg.data_dir, name_only=False),
        data_description=f"{cfg.dataset} test split ({len(data.test_labels)} images from {source})",
        command=command, seed=cfg.seed, machine=machine_description(device),
    )


def startup_lines(cfg: TrainConfig, data_summary: str, startup: Startup, steps_per_epoch: int, plan: RunPlan, budgeted: bool,
                  precision_line: str | None, validated: bool, dist: DistInfo) -> list[str]:
    """What a run prints before its first step: config, data, device and precision, length, selection, start-up."""
    device = startup.device
    lines = ["config:\n" + cfg.format(), data_summary,
             f"device {device}, precision {startup.amp_dtype or torch.float32}, channels_last {startup.channels_last}, "
             f"{steps_per_epoch} steps/epoch x {plan.epochs} epochs"
             + (f" ({plan.total_steps} steps in all)" if plan.total_steps % steps_per_epoch else "")
             + (" to start with: --time-budget re-plans them as it goes" if budgeted else "")]
    lines += [precision_line] if precision_line else []
    refused = fused_refusal(cfg.optimizer, device) if device.type == "cuda" and cfg.optimizer in FUSED_KERNELS else None
    lines += [f"torch {torch.__version__} refuses fused {cfg.optimizer} on {device} ({refused}): its foreach kernels instead"] if refused else []
    if cfg.compile == "auto" and not budgeted:
        lines.append("--compile auto: eager (only a --time-budget run knows its length to weigh a compilation against; "
                     "--compile on compiles)")
    lines.append(f"best checkpoint chosen on the {'validation split' if validated else 'TEST set (no --val-size given)'}")
    if dist.enabled:
        lines.append(f"distributed: {dist.world_size} processes, global batch {cfg.batch_size * dist.world_size}, "
                     f"lr {cfg.lr * startup.lr_scale:g}")
    age = process_age()
    if age is not None:
        lines.append(f"start-up: {age:.1f}s since the process began (imports, data, model, precision timing, budget calibration)")
    return lines


def sync_debug(cfg: TrainConfig, device: torch.device, out, on: bool = True) -> None:
    """--sync-debug: CUDA warns at each host synchronization (logging, epoch ends and checkpoints have some);
    on=False turns it off again when the run ends (the process may go on: a notebook, the tests)."""
    if not cfg.sync_debug:
        return
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn" if on else 0)
    if on:
        out("--sync-debug: a warning marks each host synchronization; a clean step has none between log lines"
            if device.type == "cuda" else "--sync-debug watches CUDA only; on this device count the calls with python bench/sync_count.py")
