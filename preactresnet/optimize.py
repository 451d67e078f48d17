"""optimize_system.py: report the machine, time real training steps per setting, save the winner.

Settings only help when measured on the machine and model that will use them (bf16 is 10x slower than
fp32 on a CPU without AVX512-BF16; channels_last has been slower for grouped convolutions on some
PyTorch versions), so nothing here is a guess: every candidate is timed, warm-up excluded, and the
fastest goes into a profile that train.py applies by default.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import convgrad, precision
from .config import TrainConfig
from .distributed import DistInfo
from .data.augment import AugmentConfig, BatchAugment
from .fileio import first_line
from .models import check_model_name, create_model
from .optim import build_optimizer
from .profile import write_profile
from .step import timing_parts, train_step
from .system import compile_module, cpu_flags, cpu_has_bf16, cpu_name, cuda_has_bf16, resolve_device, tune_malloc


def gpu_report(device: torch.device | None) -> list[dict]:
    """Each visible GPU; free memory on `device` only (reading it opens a context, which a GPU in exclusive
    mode held by another process refuses)."""
    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        used = device is not None and device.type == "cuda" and device.index == i
        free = torch.cuda.mem_get_info(i)[0] if used else None
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "free_gib": round(free / 2**30, 1) if free is not None else "not read (not this run's GPU)",
               "compute_capability": f"{props.major}.{props.minor}"}
        for key, fn in (("utilization_pct", torch.cuda.utilization), ("temperature_c", torch.cuda.temperature)):
            try:
                gpu[key] = fn(i)
            except Exception:  # needs pynvml / a driver that tells
                gpu[key] = None
        gpus.append(gpu)
    return gpus


def system_report(data_dir: str = "data", checkpoint_dir: str = "checkpoints", device: torch.device | None = None) -> tuple[dict, list[str]]:
    """Versions, GPUs, CPU features, memory and disk, plus warnings for what will be slow."""
    report: dict = {
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_features": sorted(f for f in cpu_flags() if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"}),
        "gpus": [],
    }
    warnings = []
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        report["ram_gib"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        report["ram_gib"] = None
    report["gpus"] = gpu_report(device)
    for name, folder in (("data", data_dir), ("checkpoints", checkpoint_dir)):
        probe = Path(folder)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe if probe.exists() else ".").free / 2**30
        report[f"free_disk_gib_{name}"] = round(free, 1)
        if free < 2:
            warnings.append(f"only {free:.1f} GiB free where {name} go ({folder}); CIFAR-10 and checkpoints need about 2 GiB")
    if not report["gpus"]:
        warnings.append("no CUDA GPU: training runs on the CPU, tens of minutes or more per epoch at full width (the demo uses width 0.25)")
    if not cpu_has_bf16():
        warnings.append("this CPU has no AVX512-BF16/AMX: bf16 autocast is emulated and slow here, fp32 is used")
    if (report["cores_usable"] or 1) < 4:
        warnings.append(f"{report['cores_usable']} usable cores: little room for a data loader beside the model "
                        "(this project's loader keeps the data on the device, so it needs none)")
    return report, warnings


def candidates(device: torch.device, quick: bool) -> list[dict]:
    threads = os.cpu_count() or 1
    rows = []
    if device.type == "cuda":
        precisions = ["fp32", "tf32", "bf16", "fp16"] if cuda_has_bf16(device) else ["fp32", "tf32", "fp16"]
        for amp in precisions:
            for cl in ("off", "on"):
                rows.append({"amp": amp, "channels_last": cl, "threads": 0, "compile": False, "cudnn_benchmark": True})
        rows.append({"amp": precisions[2], "channels_last": "on", "threads": 0, "compile": False, "cudnn_benchmark": False})
        if not quick:
            rows.append({"amp": precisions[2], "channels_last": "on", "threads": 0, "compile": True, "cudnn_benchmark": True})
    else:
        for amp in ("fp32", "bf16"):
            for cl in ("off", "on"):
                rows.append({"amp": amp, "channels_last": cl, "threads": threads, "compile": False})
        if threads > 1:
            rows.append({"amp": "fp32", "channels_last": "on", "threads": max(1, threads // 2), "compile": False})
        if not quick:
            rows.append({"amp": "fp32", "channels_last": "on", "threads": threads, "compile": True})
    return rows


@contextmanager
def _settings(device: torch.device, c: dict):
    saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        if c.get("threads"):
            torch.set_num_threads(c["threads"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = c.get("cudnn_benchmark", True)
            # "fp32" is what train.py --amp off runs: PyTorch's defaults, TF32 convolutions and fp32 matmuls
            # (a baseline without TF32 at all would overstate every speed-up); "tf32" adds TF32 matmuls.
            torch.backends.cuda.matmul.allow_tf32 = c["amp"] == "tf32"
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]


def time_setting(model_name: str, width_mult: float, batch: int, device: torch.device, c: dict, warmup: int, steps: int,
                 optimizer: TrainConfig | None = None) -> float:
    """Images per second of whole training steps as train.py runs them (batched augmentation of uint8
    images on the device, forward, backward, and the run's optimizer built as train.py builds it: fused on
    CUDA, Muon with its orthogonalization dtype), warm-up excluded."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["amp"])
    fmt = torch.channels_last if c["channels_last"] == "on" else torch.contiguous_format
    with _settings(device, c):
        torch.manual_seed(0)
        model = create_model(model_name, width_mult=width_mult).to(device, memory_format=fmt)
        if c.get("conv_wgrad", "aten") != "aten":  # as train.py's --conv-wgrad (bench/conv_wgrad.py times it)
            convgrad.configure(model, c["conv_wgrad"], (3, 32, 32), batch, dtype, fmt == torch.channels_last, DistInfo())
        step_model = compile_module(model) if c["compile"] else model
        opt = build_optimizer(optimizer or TrainConfig(optimizer="sgd", lr=0.01), model)
        parts = timing_parts(model, step_model, opt, device, dtype)
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
        augment = BatchAugment(AugmentConfig(), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), dtype or torch.float32, fmt == torch.channels_last)
        g = torch.Generator(device=device).manual_seed(0)
        y = torch.randint(0, 10, (batch,), device=device)

        def step(i: int):  # the training loop's own step (step.train_step)
            train_step(parts, augment(images, g, seed=i), y, i + 1)

        for i in range(warmup):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * batch / (time.perf_counter() - start)


def timing_steps(device: torch.device, quick: bool) -> tuple[int, int]:
    """(warm-up, timed) steps per setting: GPU steps take milliseconds, so enough of them, even with --quick."""
    if device.type == "cuda":
        return (5, 20) if quick else (10, 50)
    return (1, 2) if quick else (3, 10)


def measure(model_name: str, batch: int, device: torch.device, quick: bool, width_mult: float = 1.0, out=print,
            optimizer: TrainConfig | None = None) -> list[dict]:
    warmup, steps = timing_steps(device, quick)
    rows = []
    for c in candidates(device, quick):
        try:
            ips = time_setting(model_name, width_mult, batch, device, c, warmup, steps, optimizer)
        except Exception as err:  # a setting this machine cannot run (compile without a compiler, say)
            out(f"  skipped {describe(c)}: {type(err).__name__}: {first_line(err, '')}")
            continue
        rows.append({**c, "images_per_sec": round(ips, 1)})
        out(f"  {describe(c):<52} {ips:10.1f} images/s")
    if not rows:
        raise RuntimeError("no setting could be measured on this machine")
    base = next((r for r in rows if r["amp"] == "fp32" and r["channels_last"] == "off" and not r["compile"]), rows[0])
    for r in rows:
        r["speedup"] = round(r["images_per_sec"] / base["images_per_sec"], 2)
    return rows


def describe(c: dict) -> str:
    gpu_names = {"fp32": "fp32 (TF32 convs, the default)", "tf32": "TF32 convs + matmuls"}
    precision = gpu_names.get(c["amp"], c["amp"]) if "cudnn_benchmark" in c else c["amp"]  # only GPU rows have it
    parts = [precision, "channels_last" if c["channels_last"] == "on" else "NCHW"]
    if c.get("threads"):
        parts.append(f"{c['threads']} threads")
    if "cudnn_benchmark" in c:
        parts.append("cudnn.benchmark" if c["cudnn_benchmark"] else "no cudnn.benchmark")
    if c["compile"]:
        parts.append("torch.compile")
    return ", ".join(parts)


def muon_ns_dtype(model: str, width: float, batch: int, device: torch.device, out=print) -> str:
    """Muon's orthogonalization dtype for the profile: timed (or read from the cache) as train.py's auto does."""
    cfg = TrainConfig(model=model, width_mult=width, batch_size=batch, optimizer="muon", device=str(device))
    chosen, line = precision.decide(cfg, ("ns",), 10, True)
    out(line)
    return chosen["muon_ns_dtype"]


def raise_priority(out=print) -> bool:
    """Ask the OS for a higher scheduling priority; without permission it is a warning, never a failure."""
    try:
        before = os.nice(0)
        os.nice(-5)
        out(f"process priority raised: nice {before} -> {os.nice(0)} (this process; run train.py with `nice -n -5` to keep it)")
        return True
    except (PermissionError, OSError, AttributeError) as err:
        out(f"warning: could not raise process priority ({type(err).__name__}: {err}); run as root or with "
            "`sudo nice -n -5 python train.py` if you need it")
        return False


def env_lines(device: torch.device, profile: dict) -> list[str]:
    """Settings that must live in the environment of a later process (set in one, they do not carry)."""
    lines = []
    threads = profile["settings"].get("threads")
    if device.type == "cuda":
        lines.append("export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation with varying shapes")
    elif threads:
        lines.append(f"export OMP_NUM_THREADS={threads}  # for other PyTorch programs; train.py applies the profile itself")
    return lines


def run(args) -> None:
    """optimize_system.py: report the machine, time every candidate, write the profile (cli.py parses the flags)."""
    model = check_model_name(args.model)
    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2, got {args.batch_size}")
    if Path(args.profile).is_dir():  # found before the minutes of timing, not after
        raise ValueError(f"--profile {args.profile} is a folder; pass a file such as {Path(args.profile) / 'profile.json'}")
    device = resolve_device(args.device)
    tune_malloc()
    report, warnings = system_report(args.data_dir, args.checkpoint_dir, device)
    print("system:")
    for k, v in report.items():
        if k != "gpus":
            print(f"  {k:<28} {v}")
    for i, g in enumerate(report["gpus"]):
        print(f"  gpu {i}: " + ", ".join(f"{k} {v}" for k, v in g.items()))
    for w in warnings:
        print(f"warning: {w}")
    if not args.no_priority:
        raise_priority()

    width = args.width_mult if args.width_mult is not None else (0.25 if args.quick and device.type == "cpu" else 1.0)
    batch = min(args.batch_size, 32) if args.quick and device.type == "cpu" else args.batch_size
    ns = muon_ns_dtype(model, width, batch, device)
    optimizer = TrainConfig(model=model, optimizer=args.optimizer, muon_ns_dtype=ns, device=str(device))
    print(f"\ntiming training steps: {model} (width x{width}), batch {batch}, {args.optimizer}, on {device}"
          + (" [--quick: a narrower net and fewer steps stand in for the full run]" if width != 1.0 or batch != args.batch_size else ""))
    rows = measure(model, batch, device, args.quick, width, optimizer=optimizer)
    profile = write_profile(Path(args.profile), device, model, batch, rows, width, extra={"muon_ns_dtype": ns})
    print("\n| setting | images/s | speed-up vs fp32 NCHW |\n|---|---:|---:|")
    for r in sorted(rows, key=lambda r: -r["images_per_sec"]):
        print(f"| {describe(r)} | {r['images_per_sec']:.1f} | {r['speedup']:.2f}x |")
    best = max(rows, key=lambda r: r["images_per_sec"])
    print(f"\nfastest: {describe(best)}; wrote {args.profile}, which python train.py --model {model} now applies "
          "(--profile off ignores it; --deterministic always wins)")
    for line in env_lines(device, profile):
        print(line)


__all__ = ["measure", "raise_priority", "run", "system_report", "timing_steps"]
