"""Using trained weights: find a checkpoint, rebuild its model, predict with optional test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, check_metadata, load_weights, portable_path, read_metadata
from .data import BatchAugment, TensorLoader, load_dataset
from .data.augment import constant
from .data.sources import SAMPLE_NAME
from .evaluation import EvalResult, accuracy_of, batch_confusion, confusion_counts, evaluate
from .fileio import first_line
from .models import create_model
from .system import autocast

TTA_MODES = ("none", "flip", "flip-translate")


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def newest_run_weights(checkpoint_dir: str | Path, name: str = "best.safetensors") -> Path | None:
    """The newest run's `name` under checkpoint_dir, or None where nothing is trained there yet."""
    root = Path(checkpoint_dir)
    return _newest(list(root.glob(f"*/{name}"))) if root.is_dir() else None


def resolve_checkpoint(spec: str | None, checkpoint_dir: str | Path = "checkpoints", ema: bool = False) -> Path:
    """A .safetensors file, a run folder, a run name, a pretrained folder, or None for the newest run."""
    name = "ema.safetensors" if ema else "best.safetensors"
    root = Path(checkpoint_dir)
    if spec is None:
        found = newest_run_weights(root, name)
        if found is None:
            raise CheckpointError(f"no {name} under {root}/; train first (make demo) or pass --checkpoint PATH")
        return found
    for candidate in (Path(spec), root / spec):
        if candidate.is_file():
            return ema_checked(candidate) if ema else candidate
        if candidate.is_dir():
            for fname in (name, "model.safetensors") if ema else (name, "model.safetensors", "last.safetensors"):
                if (candidate / fname).is_file():
                    return ema_checked(candidate / fname) if ema else candidate / fname
            if ema:  # never the plain weights in its place: the figure would be mislabelled
                raise CheckpointError(f"{candidate} holds no ema.safetensors: its run trained without --ema; drop --ema")
            raise CheckpointError(f"{candidate} holds no {name}, model.safetensors or last.safetensors")
    raise CheckpointError(f"checkpoint '{spec}' not found (neither a file, a folder, nor a run under {root}/)")


def ema_checked(path: Path) -> Path:
    if not read_metadata(path).get("ema"):
        raise CheckpointError(f"--ema was asked for, but {path} holds a run's plain weights, not its EMA; drop --ema")
    return path


def eval_loader(lm: "LoadedModel", images, labels, device, batch_size: int, amp_dtype) -> TensorLoader:
    # Normalization comes from the checkpoint, never from the data being evaluated.
    tf = BatchAugment(None, lm.mean, lm.std, amp_dtype or torch.float32, channels_last=True)
    return TensorLoader(images, labels, batch_size, train=False, transform=tf, device=device)


def accuracy_on(lm: "LoadedModel", data_dir: str, device=None, amp_dtype=None, batch_size: int = 500) -> tuple[float, str]:
    """Plain accuracy of a loaded model on a data folder's test split, and the words that name that data."""
    ds = load_dataset(lm.meta.get("dataset", "cifar10"), data_dir, download=False)
    loader = eval_loader(lm, ds.test_images, ds.test_labels, device or torch.device("cpu"), batch_size, amp_dtype)
    probs, labels = predict_probs(lm.model, loader, "none", amp_dtype)
    where = "the bundled sample" if data_dir == SAMPLE_NAME else portable_path(data_dir)
    return metrics_from_probs(probs, labels, len(lm.classes)).accuracy, f"{ds.name} test split ({len(labels)} images from {where})"


@dataclass
class LoadedModel:
    model: nn.Module
    meta: dict
    path: Path

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.meta["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.meta["std"])


def load_model(path: str | Path, device: torch.device | str = "cpu", channels_last: bool = True) -> LoadedModel:
    """Rebuild the model a weights file names and load it strictly (any missing or extra key is an error).
    channels_last: the memory format of the batches test.py and predict.py feed (no reformat per call)."""
    path = Path(path)
    state, meta = load_weights(path)
    check_metadata(meta, path)
    model = create_model(meta["model"], **meta["model_args"])
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), first_line(err))
        raise CheckpointError(f"{path} does not fit {meta['model']} ({first})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit {meta['model']}: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:2]}, {len(result.unexpected_keys)} unexpected {result.unexpected_keys[:2]}"
        )
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    return LoadedModel(model, meta, path)


def tta_views(x: torch.Tensor, mode: str, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> list[torch.Tensor]:
    """The images a TTA mode averages over: itself; + its mirror; + both shifted 2 px four ways.

    `x` is normalized with `mean`/`std`; shifts pad with black in pixel space, as training's crops do.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown --tta '{mode}'; use one of {', '.join(TTA_MODES)}")
    views = [x]
    if mode in ("flip", "flip-translate"):
        views.append(x.flip(3))
    if mode == "flip-translate":
        black = constant(tuple(-m / s for m, s in zip(mean, std)), x.device, x.dtype)
        (n, c, h, w) = x.shape
        padded = black.expand(n, c, h + 4, w + 4).clone()
        padded[:, :, 2:-2, 2:-2] = x
        for dy, dx in ((0, 2), (4, 2), (2, 0), (2, 4)):
            shifted = padded[:, :, dy : dy + h, dx : dx + w]
            views += [shifted, shifted.flip(3)]
    return views


@torch.no_grad()
def predict_probs(model: nn.Module, loader, tta: str = "none", amp_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (averaged over TTA views) and labels for every image of an eval loader."""
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        views = tta_views(x, tta, loader.transform.mean, loader.transform.std)
        total = torch.zeros(())
        for view in views:
            with autocast(loader.device, amp_dtype):
                total = total + model(view).float().softmax(dim=1)
        probs.append((total / len(views)).cpu())
        labels.append(y.cpu())
    return torch.cat(probs), torch.cat(labels)


def tta_accuracy(model: nn.Module, loader, mode: str, num_classes: int, amp_dtype=None, reduce=None) -> float:
    """Test accuracy of `model` averaged over the `mode` TTA views; `reduce` sums the counts over ranks."""
    probs, labels = predict_probs(model, loader, mode, amp_dtype)
    confusion = batch_confusion(probs.to(loader.device), labels.to(loader.device), num_classes)
    if reduce is not None:
        reduce(confusion)
    return accuracy_of(confusion)


def metrics_from_probs(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> EvalResult:
    confusion = batch_confusion(probs, labels, num_classes).round().long()
    correct, total, per_class = confusion_counts(confusion)
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    return EvalResult(loss, 100.0 * correct / max(total, 1), correct, total, per_class, confusion)


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> tuple[float, list[dict]]:
    """Expected calibration error (percent) and the per-bin confidence/accuracy behind the diagram."""
    conf, pred = probs.max(dim=1)
    right = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        n = int(inside.sum())
        if n:
            acc, c = float(right[inside].mean()), float(conf[inside].mean())
            ece += n / len(labels) * abs(acc - c)
            table.append({"lo": float(lo), "hi": float(hi), "count": n, "accuracy": acc, "confidence": c})
    return 100.0 * ece, table


def final_scores(model, loader, tta: str, num_classes: int, amp, all_reduce, last: EvalResult | None) -> tuple:
    """A run's closing test result (`last`: its last epoch's, or evaluated now for a finished run resumed) and the
    --tta accuracy beside it (None for 'none')."""
    final = last if last is not None else evaluate(model, loader, num_classes, amp, all_reduce)
    return final, None if tta == "none" else tta_accuracy(model, loader, tta, num_classes, amp, all_reduce)
