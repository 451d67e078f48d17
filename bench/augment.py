"""Augmentation throughput: batched on-device pipeline against torchvision's per-sample PIL pipeline.

    python bench/augment.py [--data-dir ../shared/data/cifar10-jpeg.tar.gz] [--device cpu|cuda]

Both sides run the same four transforms with the same settings (RandomCrop(32, padding=4),
RandomHorizontalFlip, ColorJitter(0.2, 0.2, 0.2, 0.05) with p=0.8, RandomErasing(p=0.25)) on the same
real images and end at the same thing: a normalized float32 batch of 256. The baseline is a
torchvision Compose inside a DataLoader with one worker per core, as popular CIFAR repositories run
it. Warm-up batches are excluded from both timings; each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preactresnet.data import AugmentConfig, BatchAugment, load_dataset  # noqa: E402


class PILDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        from PIL import Image

        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def torchvision_pipeline(cfg: AugmentConfig, mean, std):
    import torchvision.transforms as T

    return T.Compose(
        [
            T.RandomCrop(32, padding=cfg.crop_padding),
            T.RandomHorizontalFlip(cfg.flip_prob),
            T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_prob),
            T.ToTensor(),
            T.Normalize(mean, std),
            T.RandomErasing(cfg.erase_prob, cfg.erase_scale, cfg.erase_ratio, value=0),
        ]
    )


def time_baseline(images, labels, cfg, mean, std, batch, batches, workers) -> float:
    ds = PILDataset(images, labels, torchvision_pipeline(cfg, mean, std))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0
    )
    it = iter(loader)
    next(it)  # warm-up: worker start and first batch excluded
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    del it, loader
    return batches * batch / elapsed


def time_batched(images, cfg, mean, std, batch, batches, device, dtype, channels_last) -> float:
    aug = BatchAugment(cfg, mean, std, dtype=dtype, channels_last=channels_last)
    x = images.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    n = len(x) // batch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # A host seed per batch, as the training loader passes (no device read per batch); older trees lack it.
    seeded = "seed" in inspect.signature(aug.__call__).parameters

    def run(i: int):
        batch_x = x[(i % n) * batch : (i % n + 1) * batch]
        return aug(batch_x, g, seed=f"0:0:0:{i}") if seeded else aug(batch_x, g)

    for i in range(3):  # warm-up
        run(i)
    sync()
    start = time.perf_counter()
    for i in range(batches):
        run(3 + i)
    sync()
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description="augmentation throughput, batched vs torchvision PIL")
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz", help="the CIFAR-10 JPEG archive (or any --data-dir train.py reads)")
    ap.add_argument("--device", default="cpu", help="where the batched augmentation runs: cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=256, help="images per augmented batch, both sides")
    ap.add_argument("--images", type=int, default=5120, help="real training images used by both sides")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each side; the median is printed")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="baseline DataLoader workers")
    args = ap.parse_args()

    ds = load_dataset(data_dir=args.data_dir)
    images, labels = ds.train_images[: args.images], ds.train_labels[: args.images]
    cfg = AugmentConfig()
    device = torch.device(args.device)
    batches = args.images // args.batch_size
    print(f"data: {ds.summary()}; {len(images)} images, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    base = [time_baseline(images, labels, cfg, ds.mean, ds.std, args.batch_size, batches - 1, args.workers) for _ in range(args.repeats)]
    ours = [time_batched(images, cfg, ds.mean, ds.std, args.batch_size, batches * 4, device, torch.float32, False) for _ in range(args.repeats)]
    ours_cl = [time_batched(images, cfg, ds.mean, ds.std, args.batch_size, batches * 4, device, torch.float32, True) for _ in range(args.repeats)]
    ours_bf16 = [time_batched(images, cfg, ds.mean, ds.std, args.batch_size, batches * 4, device, torch.bfloat16, True) for _ in range(args.repeats)]
    b = statistics.median(base)
    print(f"torchvision PIL Compose, DataLoader x{args.workers} workers : {b:12,.0f} images/s")
    for name, runs in (("float32 NCHW (as torchvision)", ours), ("float32 channels_last", ours_cl), ("bf16 channels_last", ours_bf16)):
        o = statistics.median(runs)
        print(f"batched on {device.type}, {name:<30}: {o:12,.0f} images/s  ({o / b:.1f}x)")


if __name__ == "__main__":
    main()
