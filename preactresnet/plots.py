"""Figures, written as PNG with matplotlib's non-interactive backend."""

from __future__ import annotations

from pathlib import Path

from .fileio import atomic_write


def _pyplot():
    import matplotlib  # lazy: matplotlib is heavy and only figures need it

    matplotlib.use("Agg")  # no display needed, on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, tight: bool = True) -> Path:
    """bbox_inches="tight" draws the figure twice: figures laid out by tight_layout skip it."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight" if tight else None))


def training_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss, accuracy and learning rate against epoch, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    def curve(ax, key: str, label: str) -> None:  # the epochs that have the figure (--eval-every skips some)
        points = [(r["epoch"], r[key]) for r in history if r.get(key) not in (None, "")]
        if points:
            ax.plot(*zip(*points), marker=".", label=label)

    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train (augmented batches)")
    curve(ax, "test_loss", "test")
    curve(ax, "val_loss", "validation")
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax.legend()
    ax = axes[1]
    curve(ax, "test_acc", "test")
    curve(ax, "val_acc", "validation")
    curve(ax, "ema_test_acc", "test (EMA weights)")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if ax.lines:  # none before the first evaluation
        ax.legend()
    ax = axes[2]
    ax.plot(epochs, [r["lr"] for r in history], marker=".")
    ax.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = _save(fig, Path(path), tight=False)
    plt.close(fig)
    return out


def _to_images(x_uint8):
    return x_uint8.permute(0, 2, 3, 1).cpu().numpy()


def confusion_matrix(confusion, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalized confusion matrix (percent of each true class), counts written in the cells."""
    plt = _pyplot()
    counts = confusion.float()
    rates = 100 * counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * k, 0.8 + 0.55 * k))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=100)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 50 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "Confusion matrix (cells: counts)")
    fig.colorbar(im, ax=ax, label="% of the true class")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def per_class_bars(per_class: list[float], classes: list[str], path: str | Path, overall: float, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes)), 4))
    bars = ax.bar(range(len(classes)), per_class, color="tab:blue")
    ax.axhline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.2f}%")
    if len(classes) <= 20:
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 105), title=title or "Per-class test accuracy")
    ax.legend(loc="lower right")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def prediction_grid(images, labels, preds, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Test images with predicted / true labels; mistakes in red."""
    plt = _pyplot()
    n = len(images)
    cols = 8
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.85))
    imgs = _to_images(images)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(imgs[i], interpolation="nearest")
        ok = int(preds[i]) == int(labels[i])
        text = f"{classes[int(preds[i])]}" if ok else f"{classes[int(preds[i])]}\n(true: {classes[int(labels[i])]})"
        ax.set_title(text, fontsize=7, color="black" if ok else "red")
    fig.suptitle(title or "Test predictions (red: mistakes, with the true class)")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def augmented_grid(images, targets, classes: list[str], path: str | Path, title: str = "") -> Path:
    """What the model sees: un-normalized augmented (and mixed) images with their soft targets.
    The images tiled on one canvas with their labels as text: one axes per image cost 1.2 s per run."""
    import numpy as np

    plt = _pyplot()
    n, cols = len(images), 8
    rows = (n + cols - 1) // cols
    h, w = images.shape[-2:]
    gap_x, gap_y = w // 8, h * 3 // 4  # room between images, and above each for its targets
    canvas = np.ones((rows * (h + gap_y), cols * (w + gap_x) - gap_x, 3), dtype=np.float32)
    imgs = images.permute(0, 2, 3, 1).clamp(0, 1).float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(cols * 1.6, rows * 1.8))
    for i in range(n):
        top, left = (i // cols) * (h + gap_y) + gap_y, (i % cols) * (w + gap_x)
        canvas[top : top + h, left : left + w] = imgs[i]
        best = targets[i].float().topk(2)
        parts = [f"{classes[int(c)]} {float(p):.2f}" for p, c in zip(best.values, best.indices) if float(p) > 0.15]
        ax.text(left + w / 2, top - 1, "\n".join(parts), fontsize=7, ha="center", va="bottom")
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title or "Augmented training batch (targets after label smoothing and mixing)")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def reliability_diagram(table: list[dict], ece: float, path: str | Path, title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    mids = [(r["lo"] + r["hi"]) / 2 for r in table]
    width = (table[0]["hi"] - table[0]["lo"]) if table else 0.066
    ax.bar(mids, [r["accuracy"] for r in table], width=width * 0.95, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=title or f"Reliability diagram (ECE {ece:.2f}%)")
    ax.legend(loc="upper left")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def accuracy_by_epoch(runs: dict[str, list[tuple[int, float]]], path: str | Path, curves: dict | None = None) -> Path:
    """Evaluated checkpoints as points, and each run's logged per-epoch test accuracy as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (run, points) in enumerate(sorted(runs.items())):
        color = f"C{i % 10}"
        if curves and run in curves:
            ep, acc = zip(*curves[run])
            ax.plot(ep, acc, color=color, alpha=0.6)
        ep, acc = zip(*sorted(points))
        ax.scatter(ep, acc, color=color, label=run, zorder=3)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy of checkpoints by epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
