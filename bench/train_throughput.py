"""Training throughput: this trainer's default path against the plain loop of popular CIFAR repositories.

    python bench/train_throughput.py [--model preactresnet18] [--batch-size 128] [--steps 6] [--config configs/cpu_15min.yaml]

Both sides train the same network from the zoo on the same real CIFAR-10 images with the same
augmentations (RandomCrop, RandomHorizontalFlip, ColorJitter, RandomErasing), on the same machine in
the same run:
  reference  fp32 (TF32 convolutions on GPUs, PyTorch's default), NCHW, torchvision DataLoader (one
             worker per core, pinned memory on GPUs) with PIL transforms, SGD,
             cross-entropy: the hand-written loop of kuangliu/pytorch-cifar and its many copies
  trainer    preactresnet.training.Trainer's own epoch loop with its defaults for this machine:
             uint8 data resident on the device, batched augmentation, MixUp/CutMix, label smoothing,
             Adagrad, channels_last, bf16 autocast where the hardware has it, glibc malloc tuning
Warm-up steps are excluded; images per second are counted over --steps timed steps.
Then the arithmetic: each side's FLOP rate (torch's FlopCounterMode on one training step) against this
device's matrix-multiply rate in fp32 and in the trainer's precision, timed here, and so the ratio this
device allows: the trainer's precision at its matmul rate over the reference's rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from augment import PILDataset, torchvision_pipeline  # noqa: E402  (bench/augment.py)

from preactresnet.config import TrainConfig, from_dict, load_yaml  # noqa: E402
from preactresnet.models import create_model  # noqa: E402
from preactresnet.system import PRECISION_NAMES  # noqa: E402
from preactresnet.training import Trainer  # noqa: E402


def reference(ds, cfg: TrainConfig, steps: int, warmup: int, workers: int, device: torch.device) -> float:
    model = create_model(cfg.model, num_classes=ds.num_classes, width_mult=cfg.width_mult).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    n = (steps + warmup + 1) * cfg.batch_size
    data = PILDataset(ds.train_images[:n], ds.train_labels[:n], torchvision_pipeline(cfg.augment(), ds.mean, ds.std))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True,
                                         pin_memory=device.type == "cuda")  # else non_blocking copies are synchronous
    model.train()
    start = None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        if i == warmup + steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def fp32_label(device: torch.device) -> str:
    """What fp32 means on `device`: on GPUs PyTorch's default runs convolutions in TF32."""
    return "fp32 (TF32 convolutions)" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_path(cfg: TrainConfig, steps: int, warmup: int) -> tuple[float, str, torch.dtype | None]:
    """Timed: `steps` whole training steps, augmentation included; the epoch's shuffle is made before."""
    t = Trainer.from_config(cfg, out=lambda *a: None)
    t.loaders.train.set_epoch(0)
    t.train_steps(warmup)  # warm-up: first-touch allocations, oneDNN kernel choice
    t.loaders.train.set_epoch(1)  # the epoch's order is drawn and moved to the device here, untimed
    stats = t.train_steps(steps)
    amp = t.startup.amp_dtype
    precision = PRECISION_NAMES[amp] if amp else fp32_label(t.startup.device)
    how = f"{precision}, channels_last={t.startup.channels_last}, device={t.startup.device}, compiled={t.net.compiled}"
    return stats.images / stats.seconds, how, amp


def train_gflop(cfg: TrainConfig, num_classes: int) -> float:
    """GFLOP of one training image (forward and backward of convolutions and matmuls), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(cfg.model, num_classes=num_classes, width_mult=cfg.width_mult)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, num_classes, (8,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / 8 / 1e9


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 4) -> float:
    """The best of 3 timings of n x n matrix products: what this device's kernels reach in `dtype`.
    A peak, so the best, not precision.measure's mean (which a slow call pulls below the reference's own rate)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel choice, first-touch pages
    best = 0.0
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return best


def roofline(gflop: float, ref: float, ours: float, dtype: torch.dtype | None, device: torch.device, n: int = 2048) -> str:
    """One line: each side's rate against the device's matmul rate, and the trainer/reference ratio it allows."""
    fp32 = matmul_gflops(torch.float32, device, n)
    low = matmul_gflops(dtype, device, n) if dtype else fp32
    name = PRECISION_NAMES[dtype] if dtype else "fp32"
    return (f"arithmetic: {gflop:.2f} GFLOP per training image; reference {ref * gflop:.0f} GFLOP/s ({ref * gflop / fp32:.2f} "
            f"of an fp32 matmul's {fp32:.0f}), trainer {ours * gflop:.0f} GFLOP/s ({ours * gflop / low:.2f} of a {name} "
            f"matmul's {low:.0f}): this device allows about {low / (ref * gflop):.2f}x at {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description="training images/s: trainer vs plain reference loop")
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.tar.gz", help="real training images (train.py's --data-dir)")
    ap.add_argument("--model", default="preactresnet18", help="network from the zoo, both sides")
    ap.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier (1.0: the paper's network)")
    ap.add_argument("--batch-size", type=int, default=128, help="images per step, both sides")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (compilation, allocator, caches)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="the reference loop's DataLoader workers (default: one per core)")
    ap.add_argument("--amp", default="auto", help="the trainer's precision: auto, bf16 or off")
    ap.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda")
    ap.add_argument("--compile", default="off", choices=["off", "on"],
                    help="the trainer's step: eager, or torch.compile'd (compiled during the warm-up, untimed)")
    ap.add_argument("--config", default="", help="the trainer's recipe from this YAML (optimizer, augmentation; "
                    "default: the spec's); the flags above still set model, width, batch and precision")
    args = ap.parse_args()

    recipe = load_yaml(args.config) if args.config else {}
    recipe.pop("time_budget", None)  # timed steps, not a budget
    cfg = from_dict(recipe | dict(
        model=args.model, width_mult=args.width_mult, data_dir=args.data_dir, batch_size=args.batch_size,
        epochs=1, progress=False, run_name="bench", checkpoint_dir="/tmp/preactresnet-bench", amp=args.amp,
        device=args.device, profile="off", compile=args.compile,
    ))
    from preactresnet.data import load_dataset

    ds = load_dataset(cfg.dataset, cfg.data_dir)
    print(f"{cfg.model} (width x{cfg.width_mult}), batch {cfg.batch_size}, {args.steps} timed steps after "
          f"{args.warmup} warm-up; {torch.get_num_threads()} threads; {ds.summary()}")
    ours, how, dtype = trainer_path(cfg, args.steps, args.warmup)
    from preactresnet.system import resolve_device

    ref = reference(ds, cfg, args.steps, args.warmup, args.workers, resolve_device(args.device))
    print(f"reference loop ({fp32_label(resolve_device(args.device))}, NCHW, DataLoader x{args.workers} + PIL) : {ref:8.1f} images/s")
    print(f"preactresnet Trainer ({how}) : {ours:8.1f} images/s  ({ours / ref:.2f}x)")
    print(roofline(train_gflop(cfg, ds.num_classes), ref, ours, dtype, resolve_device(args.device)))


if __name__ == "__main__":
    main()
