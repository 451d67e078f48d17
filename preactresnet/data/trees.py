"""Image trees: train/<class>/<image> and test/<class>/<image>, as a folder or a .tar/.tar.gz, decoded into
one uint8 tensor per split; and what every reader returns (`RawDataset`) and raises (`DataError`)."""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
SPLITS = ("train", "test")


class DataError(Exception):
    """A problem with the user's data, worded as one line that names the problem and the fix."""


@dataclass
class RawDataset:
    train_images: torch.Tensor  # uint8, N x 3 x 32 x 32
    train_labels: torch.Tensor  # int64, N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit and float greyscale scaled into 0-255 first (PIL's convert clips them at
    255: a 16-bit scan turns white), transparent pixels on white (not black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0  # 32-bit and float: 16-bit data if above 255
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).round().astype(np.uint8))  # 2-D uint8: mode L
    if img.mode in ("RGBA", "LA", "PA", "P"):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def _decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = to_rgb(img)
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:
        raise DataError(f"cannot read image {where} ({type(err).__name__}: {err}); remove or replace that file") from None


def _split_key(rel_parts: tuple[str, ...]) -> tuple[str, str, str] | None:
    """('x', 'train', 'cat', '0001.jpg') -> ('train', 'cat', '0001.jpg'), or None if not an image."""
    if len(rel_parts) < 3 or not rel_parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return None
    split, cls, name = rel_parts[-3:]
    if split not in SPLITS or name.startswith("."):
        return None
    return split, cls, name


def _iter_tree_folder(root: Path) -> Iterator[tuple[tuple[str, str, str], str, bytes]]:
    for split in SPLITS:
        for path in sorted((root / split).rglob("*")):
            key = _split_key(path.relative_to(root).parts)
            if key and path.is_file():
                yield key, str(path), path.read_bytes()


def _iter_tree_archive(path: Path) -> Iterator[tuple[tuple[str, str, str], str, bytes]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # streamed in archive order: no extraction, no random access
                if not member.isfile():
                    continue
                key = _split_key(tuple(Path(member.name).parts))
                if key:
                    yield key, f"{path}:{member.name}", tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} is not a readable archive ({err}); download or copy it again") from None


def read_image_tree(path: Path) -> RawDataset:
    """Decode every image of a train/ + test/ class-folder tree (folder or tar archive)."""
    items = _iter_tree_folder(path) if path.is_dir() else _iter_tree_archive(path)
    entries: dict[str, list[tuple[str, str, str, bytes]]] = {s: [] for s in SPLITS}
    for (split, cls, name), where, data in items:
        entries[split].append((cls, name, where, data))
    if not entries["train"] or not entries["test"]:
        raise DataError(
            f"{path} has no images under train/<class>/ and test/<class>/; point --data-dir at a "
            "folder or archive laid out that way, or at the official CIFAR release"
        )
    classes = sorted({cls for cls, *_ in entries["train"]})
    extra = sorted({cls for cls, *_ in entries["test"]} - set(classes))
    if extra:
        raise DataError(f"{path}: test classes {extra} have no training images; the two splits must share classes")
    index = {c: i for i, c in enumerate(classes)}
    tensors = []
    for split in SPLITS:
        rows = sorted(entries[split], key=lambda e: (index[e[0]], e[1]))  # the same order from any source
        images = np.stack([_decode_image(data, where) for _, _, where, data in rows])
        labels = torch.tensor([index[cls] for cls, *_ in rows], dtype=torch.int64)
        tensors.append((torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels))
    (tx, ty), (vx, vy) = tensors
    return RawDataset(tx, ty, vx, vy, classes)


