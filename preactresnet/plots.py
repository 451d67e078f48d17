"""Figures, written as PNG with matplotlib's non-interactive backend."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss, accuracy and learning rate against epoch, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train (with mixing)")
    ax.plot(epochs, [r["test_loss"] for r in history], label="test")
    if "val_loss" in history[0]:
        ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [r["test_acc"] for r in history], label="test")
    if "val_acc" in history[0]:
        ax.plot(epochs, [r["val_acc"] for r in history], label="validation")
    if "ema_test_acc" in history[0]:
        ax.plot(epochs, [r["ema_test_acc"] for r in history], label="test (EMA weights)")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax.legend()
    ax = axes[2]
    ax.plot(epochs, [r["lr"] for r in history])
    ax.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
