"""CIFAR from every real source into one uint8 tensor: download, official python batches, image trees.

Each reader returns a `RawDataset` (uint8 N x 3 x 32 x 32 images, int64 labels, class names per split);
`preactresnet.data.cache.load_dataset` picks the reader, caches the result and adds normalization.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..fileio import first_line
from .trees import SPLITS, DataError, RawDataset, read_image_tree

SAMPLE_NAME = "sample"
SAMPLE_FILE = Path(__file__).with_name("cifar10_sample.tar.gz")


@dataclass(frozen=True)
class OfficialRelease:
    """Where the official python release of a dataset lives and how its pickles are laid out."""

    name: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes


def num_classes_of(dataset: str) -> int:
    """The classes of --dataset, known before its data is read (the precision timing's network is built for them)."""
    return 100 if dataset == "cifar100" else 10


def _official(dataset: str) -> OfficialRelease:
    # torchvision keeps the canonical URLs and checksums; we only borrow those, not its pickle loader.
    from torchvision.datasets import CIFAR10, CIFAR100  # lazy: torchvision is heavy; only downloads need it

    if dataset == "cifar10":
        return OfficialRelease(
            "cifar10", CIFAR10.base_folder, CIFAR10.filename, CIFAR10.url, CIFAR10.tgz_md5,
            tuple(f for f, _ in CIFAR10.train_list), tuple(f for f, _ in CIFAR10.test_list),
            CIFAR10.meta["filename"], b"labels", b"label_names",
        )
    if dataset == "cifar100":
        return OfficialRelease(
            "cifar100", CIFAR100.base_folder, CIFAR100.filename, CIFAR100.url, CIFAR100.tgz_md5,
            tuple(f for f, _ in CIFAR100.train_list), tuple(f for f, _ in CIFAR100.test_list),
            CIFAR100.meta["filename"], b"fine_labels", b"fine_label_names",
        )
    raise DataError(f"unknown dataset '{dataset}'; use --dataset cifar10 or --dataset cifar100")


# ----------------------------------------------------------------------------------------------
# Official python release (archive or extracted folder)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: dicts, lists, bytes and numpy arrays; any other global is refused.

    Hand-written because torchvision's loader calls pickle.load, which runs whatever a file asks.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2: a pure function
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}', which a CIFAR batch never holds")


def _unpickle_batch(data: bytes, where: str) -> dict:
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # corrupt or crafted file: name it, never run it
        raise DataError(f"{where} is not a readable CIFAR batch ({err}); delete it and download again") from None
    if not isinstance(batch, dict):
        raise DataError(f"{where} is not a CIFAR batch (holds {type(batch).__name__}, not a dict)")
    return batch


def _batches_to_tensors(batches: list[dict], label_key: bytes, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for batch in batches:
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in batch[label_key])
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{where} has an unexpected layout ({err!r}); delete it and download again") from None
    x = torch.from_numpy(np.concatenate(images))
    y = torch.tensor(labels, dtype=torch.int64)
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} images but {len(y)} labels; delete it and download again")
    return x, y


def read_official(path: Path, dataset: str) -> RawDataset:
    """Read the official release from its .tar.gz or its extracted folder (e.g. cifar-10-batches-py/)."""
    rel = _official(dataset)
    wanted = set(rel.train_files + rel.test_files + (rel.meta_file,))
    files: dict[str, bytes] = {}
    if path.is_dir():
        for name in wanted:
            f = path / name
            if f.is_file():
                files[name] = f.read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if member.isfile() and base in wanted:
                        files[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{path} is not a readable archive ({err}); download it again") from None
    missing = sorted(wanted - set(files))
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)} of the official {dataset} release; download it again")
    meta = _unpickle_batch(files[rel.meta_file], f"{path}/{rel.meta_file}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(rel.names_key, [])]
    train = [_unpickle_batch(files[f], f"{path}/{f}") for f in rel.train_files]
    test = [_unpickle_batch(files[f], f"{path}/{f}") for f in rel.test_files]
    tx, ty = _batches_to_tensors(train, rel.label_key, str(path))
    vx, vy = _batches_to_tensors(test, rel.label_key, str(path))
    return RawDataset(tx, ty, vx, vy, classes)


def download_official(data_dir: Path, dataset: str) -> Path:
    """Download the official archive into data_dir through torchvision (MD5-verified); return its path."""
    from torchvision.datasets.utils import check_integrity, download_url  # lazy: heavy, download only

    rel = _official(dataset)
    archive = data_dir / rel.archive
    if check_integrity(str(archive), rel.md5):
        return archive
    made = not data_dir.exists()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        download_url(rel.url, str(data_dir), rel.archive, rel.md5)
    except Exception as err:  # URLError, timeouts, DNS failures: all mean "no usable network"
        reason = first_line(err)
        if made and not any(data_dir.iterdir()):  # a mistyped path leaves no empty folder behind
            data_dir.rmdir()
        raise DataError(
            f"no {dataset} in {data_dir}, and downloading it from {rel.url} failed ({reason}); with no network, pass "
            f"--data-dir PATH to a copy you have (the official archive, its extracted folder, or a "
            f"train/<class>/ test/<class>/ image tree), or --data-dir sample for the bundled sample"
        ) from None
    if not check_integrity(str(archive), rel.md5):
        raise DataError(f"{archive} failed its MD5 check; delete it and run again to re-download")
    return archive


# ----------------------------------------------------------------------------------------------
# Which reader a --data-dir needs


@dataclass(frozen=True)
class Source:
    kind: str  # "official", "tree" or "download"
    path: Path

    def fingerprint_files(self) -> Iterable[Path]:
        """The files whose change must rebuild the cache (never the cache folder itself)."""
        if self.path.is_file():
            return [self.path]
        if self.kind == "official":
            return sorted(p for p in self.path.iterdir() if p.is_file())
        if self.kind == "tree":
            return sorted(p for split in SPLITS for p in (self.path / split).rglob("*") if p.is_file())
        return []


def _archive_kind(path: Path, rel: OfficialRelease) -> str:
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
            while first is not None and not first.name.strip("./"):
                first = tar.next()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable archive ({err}); download or copy it again") from None
    if first is None:
        raise DataError(f"{path} is an empty archive; download or copy it again")
    return "official" if Path(first.name).parts[0] == rel.folder else "tree"


def resolve_source(data_dir: str | os.PathLike, dataset: str = "cifar10") -> Source:
    """Decide how to read `data_dir`: 'sample', an archive, an official folder, an image tree, or download."""
    rel = _official(dataset)
    if str(data_dir) == SAMPLE_NAME:
        if dataset != "cifar10":
            raise DataError("the bundled sample is CIFAR-10 only; drop --data-dir sample or use --dataset cifar10")
        return Source("tree", SAMPLE_FILE)
    path = Path(data_dir).expanduser()
    if path.is_file():
        return Source(_archive_kind(path, rel), path)
    if path.is_dir():
        if (path / rel.folder).is_dir():
            return Source("official", path / rel.folder)
        if (path / rel.train_files[0]).is_file():
            return Source("official", path)
        if (path / "train").is_dir() and (path / "test").is_dir():
            return Source("tree", path)
        from torchvision.datasets.utils import check_integrity  # lazy: heavy, official archives only

        if check_integrity(str(path / rel.archive), rel.md5):
            return Source("official", path / rel.archive)
    elif path.exists():
        raise DataError(f"--data-dir {path} is neither a folder nor an archive")
    return Source("download", path)


def read_source(source: Source, dataset: str) -> RawDataset:
    """Decode a local source (official release or image tree) into tensors."""
    if source.kind == "official":
        return read_official(source.path, dataset)
    if source.kind == "tree":
        return read_image_tree(source.path)
    raise DataError(f"{source.path} holds no {dataset} data yet; download it first")
