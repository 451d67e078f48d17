"""The optimization recipe's parts: parameter groups, optimizer, learning-rate schedule, MixUp/CutMix, EMA.

Each is built from the finished config by one function; timm supplies the algorithms.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3

from .config import TrainConfig


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """Weights get weight decay; BN parameters and biases none, and their own lr scale (timm's schedulers
    multiply a group's lr by its 'lr_scale'). Under Muon, the classifier takes the AdamW fallback."""
    weights, others, head = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1:
            others.append(param)
        elif cfg.optimizer == "muon" and name.startswith("head."):
            head.append(param)
        else:
            weights.append(param)
    groups = [{"params": weights, "weight_decay": cfg.weight_decay}]
    if head:
        groups.append({"params": head, "weight_decay": cfg.weight_decay, "use_fallback": True})
    if others:
        groups.append({"params": others, "weight_decay": 0.0, "lr_scale": cfg.bn_lr_scale})
    return groups


FUSED_ON_CUDA = ("sgd", "adamw", "adagrad")  # torch's fused kernels (timm passes `fused` through)


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr_scale: float = 1) -> torch.optim.Optimizer:
    # timm's 'sgd' is Nesterov SGD; its 'muon' orthogonalizes conv/linear updates, AdamW for the rest.
    extra = {"nesterov": True} if cfg.optimizer == "muon" else {}
    if cfg.optimizer in FUSED_ON_CUDA and next(model.parameters()).is_cuda:
        extra["fused"] = True  # one kernel for all parameters, and GradScaler's fp16 check stays on the GPU
    # Every group starts at the base lr: the scheduler applies each group's 'lr_scale' from its first step on.
    return create_optimizer_v2(
        param_groups(cfg, model), opt=cfg.optimizer, lr=cfg.lr * lr_scale, weight_decay=cfg.weight_decay,
        momentum=cfg.momentum, **extra,
    )


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, lr_scale: float = 1):
    """Linear warmup from warmup_lr to lr, then cosine (or linear) decay to min_lr, counted in steps."""
    total = cfg.total_steps or cfg.epochs * steps_per_epoch
    warmup = min(int(round(cfg.warmup_epochs * steps_per_epoch)), total - 1)
    common = dict(
        t_initial=max(1, total - warmup),
        lr_min=cfg.min_lr * lr_scale,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr * lr_scale,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    if cfg.schedule == "linear":  # polynomial decay of power 1: a straight line to min_lr
        return PolyLRScheduler(optimizer, power=1.0, **common)
    return CosineLRScheduler(optimizer, **common)


def build_mixup(cfg: TrainConfig, num_classes: int):
    """timm's Mixup builds every target, mixed or not, so label smoothing is applied exactly once."""
    mixup = Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mix_prob,
        switch_prob=cfg.mix_switch_prob,
        mode="batch",
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
    mixup.mixup_enabled = cfg.mixing
    return mixup


def build_ema(cfg: TrainConfig, model: nn.Module) -> ModelEmaV3 | None:
    """timm's EMA of the weights; with ema_warmup its decay ramps up, so short runs profit from it too."""
    return ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup) if cfg.ema else None


__all__ = ["build_ema", "build_mixup", "build_optimizer", "build_scheduler", "param_groups"]
