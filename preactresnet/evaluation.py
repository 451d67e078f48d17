"""Accuracy, loss, per-class accuracy and the confusion matrix over a loader, counted on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import DistInfo, broadcast_buffers
from .system import autocast


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # percent
    correct: int
    total: int
    per_class: list[float]  # percent, one per class
    confusion: torch.Tensor  # rows: true class, columns: predicted class

    def per_class_table(self, classes: list[str]) -> str:
        width = max(len(c) for c in classes)
        rows = [f"  {c:<{width}}  {a:6.2f}%" for c, a in zip(classes, self.per_class)]
        return "\n".join(rows)


def batch_confusion(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The k x k confusion counts of a batch (rows: true class, columns: predicted), float64 on the device.

    The one place accuracy is counted (evaluation, TTA, test.py): one-hot(true)^T @ one-hot(predicted) is
    exact and reads nothing back (bincount's output size depends on the data; F.one_hot checks its range)."""
    classes = torch.arange(num_classes, device=labels.device)
    truth, predicted = (labels[:, None] == classes).float(), (scores.argmax(dim=1)[:, None] == classes).float()
    return (truth.T @ predicted).double()


def accuracy_of(confusion: torch.Tensor) -> float:
    """Percent of images on the diagonal of summed confusion counts."""
    return 100.0 * float(confusion.diag().sum()) / max(float(confusion.sum()), 1.0)


def confusion_counts(confusion: torch.Tensor) -> tuple[int, int, list[float]]:
    correct = int(confusion.diag().sum())
    total = int(confusion.sum())
    per_class_total = confusion.sum(dim=1).clamp_min(1)
    per_class = (100.0 * confusion.diag() / per_class_total).tolist()
    return correct, total, per_class


class EvaluationStopped(Exception):
    """A stop was agreed in the middle of an evaluation (`evaluate`'s `should_stop`)."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, amp_dtype: torch.dtype | None = None, reduce=None,
             should_stop=None) -> EvalResult:
    """Every image of `loader` once; `reduce` (e.g. an all-reduce) sums counts across processes.

    Counted on the device without a host synchronization per batch: the confusion matrix of a batch is
    one-hot(true)^T @ one-hot(predicted), exact and deterministic (bincount's output size depends on the
    data, so it reads the device). The one read back is at the end of the pass.
    """
    was_training = model.training
    model.eval()
    device, k = loader.device, num_classes
    totals = torch.zeros(1 + k * k, dtype=torch.float64, device=device)  # [loss sum, confusion counts], exact below 2**53
    for i, (x, y) in enumerate(loader):
        if should_stop is not None and should_stop(i):
            model.train(was_training)
            raise EvaluationStopped
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        totals[:1] += F.cross_entropy(logits, y, reduction="sum").double()
        totals[1:] += batch_confusion(logits, y, k).view(-1)
    if reduce is not None:
        reduce(totals)
    model.train(was_training)
    totals = totals.cpu()
    confusion = totals[1:].round().long().view(k, k)
    correct, total, per_class = confusion_counts(confusion)
    return EvalResult(
        loss=float(totals[0]) / max(total, 1),
        accuracy=100.0 * correct / max(total, 1),
        correct=correct,
        total=total,
        per_class=per_class,
        confusion=confusion,
    )


@dataclass
class EpochEval:
    """An epoch's scores: the model on test (and validation), and its EMA's where there is one."""

    test: EvalResult
    val: EvalResult | None = None
    ema_test: EvalResult | None = None
    ema_val: EvalResult | None = None


def evaluate_epoch(model, ema, loaders: tuple, num_classes: int, amp, all_reduce, stops: list, dist: DistInfo) -> EpochEval:
    """Test (and validation) accuracy of the model and, with --ema, of its EMA. Under torchrun every rank first
    takes rank 0's BatchNorm statistics: one model (the one rank 0 saves) scores every shard. `stops`: each
    loader's check before a batch (StopControl.before_batches)."""
    (test, val), (stop_test, stop_val) = loaders, stops
    if dist.enabled:
        broadcast_buffers(model, *([ema.module] if ema is not None else []))
    result = EpochEval(test=evaluate(model, test, num_classes, amp, all_reduce, stop_test))
    if val is not None:
        result.val = evaluate(model, val, num_classes, amp, all_reduce, stop_val)
    if ema is not None:
        result.ema_test = evaluate(ema.module, test, num_classes, amp, all_reduce, stop_test)
        if val is not None:
            result.ema_val = evaluate(ema.module, val, num_classes, amp, all_reduce, stop_val)
    return result

