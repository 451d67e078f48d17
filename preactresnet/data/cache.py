"""One cached uint8 tensor per source: decoded once, checksummed, loaded in seconds afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..fileio import atomic_write
from .sources import DataError, RawDataset, Source, download_official, read_source, resolve_source

CACHE_VERSION = "1"


@dataclass
class Dataset:
    """A dataset ready for training: uint8 N x 3 x 32 x 32 images on the CPU, labels, and metadata."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    source: str
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        val = f", {len(self.val_labels)} validation" if self.val_labels is not None else ""
        return (
            f"{self.name} from {self.source}: {len(self.train_labels)} train{val}, "
            f"{len(self.test_labels)} test images, {self.num_classes} classes"
        )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (CIFAR-10: std 0.2470...).
    From a 256-bin histogram per channel: exact, and no float64 copy of the images (0.25 s -> 0.02 s per 10,000)."""
    counts = torch.stack([torch.bincount(images[:, c].flatten(), minlength=256) for c in range(images.shape[1])])
    values = torch.arange(256, dtype=torch.float64)
    n = counts.sum(dim=1).to(torch.float64)
    mean = (counts * values).sum(dim=1) / n
    std = ((counts * values * values).sum(dim=1) / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v / 255.0, 4) for v in mean.tolist()), tuple(round(v / 255.0, 4) for v in std.tolist())


def _fingerprint(source: Source, dataset: str) -> str:
    """Changes whenever any file of the source changes (path, size or modification time)."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{dataset}|{source.kind}|{source.path.resolve()}".encode())
    for f in source.fingerprint_files():
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        print(f"warning: cache {path} is unreadable; rebuilding it", file=sys.stderr)
        return None
    if _checksum(tensors) != meta.get("checksum"):
        print(f"warning: cache {path} failed its checksum; rebuilding it", file=sys.stderr)
        return None
    return tensors, meta


def _available_source(dataset: str, data_dir: str | os.PathLike, download: bool):
    """Where the data is: a copy found in `data_dir`, or the official archive downloaded there."""
    source = resolve_source(data_dir, dataset)
    if source.kind != "download":
        return source
    if not download:
        raise DataError(
            f"no {dataset} data found in {source.path}; pass --data-dir PATH to a copy you have "
            "(official archive or folder, or a train/ test/ image tree), or allow the download"
        )
    download_official(source.path, dataset)
    return resolve_source(data_dir, dataset)  # now the verified official archive


def load_dataset(
    dataset: str = "cifar10",
    data_dir: str | os.PathLike = "data",
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    val_size: int = 0,
    seed: int = 0,
) -> Dataset:
    """Load `dataset` from `data_dir` (see `resolve_source`), through the cache in `cache_dir`.

    The cache defaults to `<data_dir>/cache` when data_dir is a writable folder, else `data/cache`.
    """
    dataset = dataset.lower()
    source = _available_source(dataset, data_dir, download)
    if cache_dir is None:
        base = Path(data_dir)
        cache_dir = base / "cache" if base.is_dir() and os.access(base, os.W_OK) else Path("data") / "cache"
    fingerprint = _fingerprint(source, dataset)
    cache_path = Path(cache_dir) / f"{dataset}-{fingerprint[:16]}.safetensors"

    cached = _read_cache(cache_path, fingerprint)
    tensors, meta = cached if cached is not None else _build_cache(source, dataset, fingerprint, cache_path)
    ds = Dataset(
        tensors["train_images"],
        tensors["train_labels"],
        tensors["test_images"],
        tensors["test_labels"],
        json.loads(meta["classes"]),
        tuple(json.loads(meta["mean"])),
        tuple(json.loads(meta["std"])),
        dataset,
        meta["source"],
    )
    return split_validation(ds, val_size, seed) if val_size else ds


def _build_cache(source: Source, dataset: str, fingerprint: str, cache_path: Path) -> tuple[dict, dict]:
    """Decode the source once, check it, and write the checksummed cache (a failed write is only a warning)."""
    raw: RawDataset = read_source(source, dataset)
    _check_raw(raw, source)
    mean, std = channel_stats(raw.train_images)
    tensors = {
        "train_images": raw.train_images.contiguous(),
        "train_labels": raw.train_labels,
        "test_images": raw.test_images.contiguous(),
        "test_labels": raw.test_labels,
    }
    meta = {
        "fingerprint": fingerprint,
        "checksum": _checksum(tensors),
        "classes": json.dumps(raw.classes),
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "source": str(source.path),
    }
    try:
        atomic_write(cache_path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except OSError as err:
        print(f"warning: could not write the data cache {cache_path} ({err}); continuing without it", file=sys.stderr)
    return tensors, meta


def _check_raw(raw: RawDataset, source: Source) -> None:
    for split, x, y in (("train", raw.train_images, raw.train_labels), ("test", raw.test_images, raw.test_labels)):
        if x.dtype != torch.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise DataError(f"{source.path}: {split} images have shape {tuple(x.shape)}, expected N x 3 x 32 x 32")
        if len(x) != len(y) or len(y) == 0:
            raise DataError(f"{source.path}: {split} split has {len(x)} images and {len(y)} labels")
        if int(y.min()) < 0 or int(y.max()) >= len(raw.classes):
            raise DataError(f"{source.path}: {split} labels fall outside the {len(raw.classes)} classes")


def split_validation(ds: Dataset, val_size: int, seed: int = 0) -> Dataset:
    """Move a class-balanced, seeded `val_size` images from train to a validation split."""
    k = ds.num_classes
    if val_size < k or val_size >= len(ds.train_labels):
        raise DataError(
            f"--val-size {val_size} must be at least the number of classes ({k}) and smaller than "
            f"the training set ({len(ds.train_labels)})"
        )
    g = torch.Generator().manual_seed(seed)
    per_class = [val_size // k + (1 if c < val_size % k else 0) for c in range(k)]
    val_idx = []
    for c in range(k):
        idx = (ds.train_labels == c).nonzero().flatten()
        if len(idx) <= per_class[c]:
            raise DataError(f"--val-size {val_size} needs {per_class[c]} images of class '{ds.classes[c]}', which has {len(idx)}")
        val_idx.append(idx[torch.randperm(len(idx), generator=g)[: per_class[c]]])
    val = torch.cat(val_idx).sort().values
    keep = torch.ones(len(ds.train_labels), dtype=torch.bool)
    keep[val] = False
    ds.val_images, ds.val_labels = ds.train_images[val], ds.train_labels[val]
    ds.train_images, ds.train_labels = ds.train_images[keep], ds.train_labels[keep]
    return ds
