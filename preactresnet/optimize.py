"""optimize_system.py: report the machine, time real training steps per setting, save the winner.

Settings only help when measured on the machine and model that will use them (bf16 is 10x slower than
fp32 on a CPU without AVX512-BF16; channels_last has been slower for grouped convolutions on some
PyTorch versions), so nothing here is a guess: every candidate is timed, warm-up excluded, and the
fastest goes into a profile that train.py applies by default.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import create_model
from .system import autocast, cpu_flags, cpu_has_bf16, cpu_name, resolve_device, tune_malloc

PROFILE_PATH = Path(".preactresnet") / "system_profile.json"
PROFILE_FORMAT = 1
# Settings a profile may choose; anything the user sets explicitly wins over it.
PROFILE_KEYS = ("amp", "channels_last", "threads", "compile")


def machine_fingerprint(device: torch.device) -> dict:
    fp = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__.split("+")[0], "device": device.type}
    if device.type == "cuda":
        fp["gpu"] = torch.cuda.get_device_name(device)
    return fp


def system_report(data_dir: str = "data", checkpoint_dir: str = "checkpoints") -> tuple[dict, list[str]]:
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
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpu = {"name": props.name, "memory_gib": round(total / 2**30, 1), "free_gib": round(free / 2**30, 1),
               "compute_capability": f"{props.major}.{props.minor}"}
        for key, fn in (("utilization_pct", torch.cuda.utilization), ("temperature_c", torch.cuda.temperature)):
            try:
                gpu[key] = fn(i)
            except Exception:  # needs pynvml / a driver that tells
                gpu[key] = None
        report["gpus"].append(gpu)
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
        precisions = ["fp32", "tf32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "tf32", "fp16"]
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
            tf32 = c["amp"] == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2], saved[3]


def time_setting(model_name: str, width_mult: float, batch: int, device: torch.device, c: dict, warmup: int, steps: int) -> float:
    """Images per second of full training steps (forward, backward, SGD step), warm-up excluded."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c["amp"])
    fmt = torch.channels_last if c["channels_last"] == "on" else torch.contiguous_format
    with _settings(device, c):
        torch.manual_seed(0)
        model = create_model(model_name, width_mult=width_mult).to(device, memory_format=fmt)
        step_model = torch.compile(model) if c["compile"] else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)

        def step():
            with autocast(device, dtype):
                loss = F.cross_entropy(step_model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * batch / (time.perf_counter() - start)


def measure(model_name: str, batch: int, device: torch.device, quick: bool, width_mult: float = 1.0, out=print) -> list[dict]:
    warmup, steps = (1, 2) if quick else (3, 10)
    rows = []
    for c in candidates(device, quick):
        try:
            ips = time_setting(model_name, width_mult, batch, device, c, warmup, steps)
        except Exception as err:  # a setting this machine cannot run (compile without a compiler, say)
            out(f"  skipped {describe(c)}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
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
    parts = [c["amp"], "channels_last" if c["channels_last"] == "on" else "NCHW"]
    if c.get("threads"):
        parts.append(f"{c['threads']} threads")
    if "cudnn_benchmark" in c:
        parts.append("cudnn.benchmark" if c["cudnn_benchmark"] else "no cudnn.benchmark")
    if c["compile"]:
        parts.append("torch.compile")
    return ", ".join(parts)


def to_train_settings(row: dict) -> dict:
    """The winning row as train.py settings (tf32 is fp32 math with TF32 matmuls: applied by train.py on GPU)."""
    return {
        "amp": "off" if row["amp"] in ("fp32", "tf32") else row["amp"],
        "channels_last": row["channels_last"],
        "threads": int(row.get("threads") or 0),
        "compile": bool(row["compile"]),
    }


def write_profile(path: Path, device: torch.device, model: str, batch: int, rows: list[dict]) -> dict:
    best = max(rows, key=lambda r: r["images_per_sec"])
    profile = {
        "format": PROFILE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_fingerprint(device),
        "model": model,
        "batch_size": batch,
        "settings": to_train_settings(best),
        "tf32": best["amp"] == "tf32",
        "cudnn_benchmark": bool(best.get("cudnn_benchmark", False)),
        "measured": rows,
    }
    from .checkpoint import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(profile, indent=2) + "\n"))
    return profile


def load_profile(spec: str, model: str, device: torch.device, warn=print) -> dict | None:
    """The profile train.py should apply, or None (off, missing, or made on another machine or model)."""
    if spec == "off":
        return None
    path = PROFILE_PATH if spec == "auto" else Path(spec)
    if not path.is_file():
        if spec != "auto":
            raise ValueError(f"--profile {path} not found; run python optimize_system.py first or pass --profile off")
        return None
    try:
        profile = json.loads(path.read_text())
        settings = profile["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        warn(f"warning: ignoring system profile {path}: unreadable; rerun python optimize_system.py")
        return None
    here = machine_fingerprint(device)
    if profile.get("format") != PROFILE_FORMAT or profile.get("machine") != here:
        warn(f"warning: ignoring system profile {path}: made on another machine or PyTorch "
             f"({profile.get('machine')}); rerun python optimize_system.py here")
        return None
    if profile.get("model") != model:
        warn(f"warning: ignoring system profile {path}: measured for {profile.get('model')}, not {model}; "
             f"run python optimize_system.py --model {model}")
        return None
    return {**profile, "path": str(path), "settings": {k: settings[k] for k in PROFILE_KEYS if k in settings}}


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


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Report this machine, time training steps per setting, and save the fastest as the profile train.py uses.")
    ap.add_argument("--model", default="preactresnet18")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width-mult", type=float, default=None, help="measure a narrower net (default: full, or 0.25 on CPU with --quick)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer steps and settings: under a minute")
    ap.add_argument("--profile", default=str(PROFILE_PATH), help="where to write the profile")
    ap.add_argument("--no-priority", action="store_true", help="do not try to raise the process priority")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    args = ap.parse_args(argv)
    try:
        from .models import canonical_name, list_models

        model = canonical_name(args.model)
        if model not in list_models():
            raise ValueError(f"unknown --model '{args.model}'; choose one of: {', '.join(list_models())}")
        if args.batch_size < 2:
            raise ValueError(f"--batch-size must be >= 2, got {args.batch_size}")
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    tune_malloc()
    report, warnings = system_report(args.data_dir, args.checkpoint_dir)
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
    print(f"\ntiming training steps: {model} (width x{width}), batch {batch}, on {device}"
          + (" [--quick: a narrower net and fewer steps stand in for the full run]" if width != 1.0 or batch != args.batch_size else ""))
    rows = measure(model, batch, device, args.quick, width)
    profile = write_profile(Path(args.profile), device, model, args.batch_size, rows)
    print("\n| setting | images/s | speed-up vs fp32 NCHW |\n|---|---:|---:|")
    for r in sorted(rows, key=lambda r: -r["images_per_sec"]):
        print(f"| {describe(r)} | {r['images_per_sec']:.1f} | {r['speedup']:.2f}x |")
    best = max(rows, key=lambda r: r["images_per_sec"])
    print(f"\nfastest: {describe(best)}; wrote {args.profile}, which python train.py --model {model} now applies "
          "(--profile off ignores it; --deterministic always wins)")
    for line in env_lines(device, profile):
        print(line)


__all__ = ["PROFILE_PATH", "load_profile", "main", "measure", "raise_priority", "system_report", "write_profile"]
