"""One optimizer step: the parts it uses, and the step itself (forward, loss, backward, optimizer, schedule, EMA).
The training loop, optimize_system.py's timing and the precision choice all step through `train_step`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from .system import autocast


@dataclass(frozen=True)
class StepParts:
    """What a training step uses, built once (and again when the time budget starts the run over)."""

    model: nn.Module  # the network itself: its parameters, what EMA follows
    train_module: nn.Module  # what the step calls: the model, wrapped for DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16's loss scaling (a no-op otherwise)
    scheduler: object  # plan.PlannedSchedule: the rate as a function of the step
    ema: object | None
    lookahead: object | None  # optim.Lookahead: the network steps back to its slow copy every few steps
    mixup: object  # timm's Mixup: mixed targets, or plain ones with label smoothing
    criterion: nn.Module
    num_classes: int
    label_smoothing: float
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float
    zero_to_none: bool  # False under DDP: its gradients are views into the all-reduce buckets, zeroed in place


class _NoMixing:  # what train_step asks of timm's Mixup: whether this batch is mixed
    mixup_enabled = False


class _ConstantRate:  # what train_step asks of the schedule: nothing to change
    def step_update(self, num_updates: int, metric=None) -> None:
        pass


def timing_parts(model: nn.Module, train_module: nn.Module, optimizer, device: torch.device, amp_dtype: torch.dtype | None,
                 num_classes: int = 10) -> StepParts:
    """A step's parts for timing it (optimize_system.py, the precision choice): no mixing, no schedule, no EMA."""
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return StepParts(model, train_module, optimizer, scaler, _ConstantRate(), None, None, _NoMixing(), SoftTargetCrossEntropy(),
                     num_classes, 0.0, device, amp_dtype, 0.0, True)


def train_step(p: StepParts, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    """Optimizer step number `step` on a batch; returns the (detached) loss without synchronizing."""
    if p.mixup.mixup_enabled:
        x, target = p.mixup(x, y)
    else:  # the same smoothed targets, built directly: no even batch needed
        target = mixup_target(y, p.num_classes, smoothing=p.label_smoothing)
    with autocast(p.device, p.amp_dtype):
        logits = p.train_module(x)
    loss = p.criterion(logits.float(), target)
    p.optimizer.zero_grad(set_to_none=p.zero_to_none)
    p.scaler.scale(loss).backward()
    if p.grad_clip > 0:
        p.scaler.unscale_(p.optimizer)
        nn.utils.clip_grad_norm_(p.model.parameters(), p.grad_clip)
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.scheduler.step_update(num_updates=step)
    if p.lookahead is not None:
        p.lookahead.step(p.model, step)
    if p.ema is not None:
        p.ema.update(p.model, step=step)
    return loss.detach()
