"""Accuracy, loss, per-class accuracy and the confusion matrix over a loader, counted on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def confusion_counts(confusion: torch.Tensor) -> tuple[int, int, list[float]]:
    correct = int(confusion.diag().sum())
    total = int(confusion.sum())
    per_class_total = confusion.sum(dim=1).clamp_min(1)
    per_class = (100.0 * confusion.diag() / per_class_total).tolist()
    return correct, total, per_class


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, amp_dtype: torch.dtype | None = None, reduce=None) -> EvalResult:
    """Every image of `loader` once; `reduce` (e.g. an all-reduce) sums counts across processes."""
    was_training = model.training
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for x, y in loader:
        with autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(dim=1), minlength=num_classes * num_classes)
    if reduce is not None:
        reduce(loss_sum)
        reduce(confusion)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    correct, total, per_class = confusion_counts(confusion)
    return EvalResult(
        loss=float(loss_sum) / max(total, 1),
        accuracy=100.0 * correct / max(total, 1),
        correct=correct,
        total=total,
        per_class=per_class,
        confusion=confusion,
    )
