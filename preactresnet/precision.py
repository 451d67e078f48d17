"""`--amp auto` and `--muon-ns-dtype auto` on a CPU: decided by timing the real candidates here, cached.

CPU flags cannot tell whether bf16 pays: it is emulated without AVX512-BF16 (many times slower), fast
for narrow layers but slower than fp32 for the full-width net on AVX512-BF16 without AMX, and fast
everywhere with AMX. So this run's model, width and batch are timed for a few seconds in each
precision (forward and backward; Muon's step with bf16 and fp32 orthogonalization), once per machine,
PyTorch version, kernel set and model shape: the answer is cached in .preactresnet/precision.json.
On a GPU the rule stays (bf16 from compute capability 8.0, else fp16) and nothing is timed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .config import ResolvedConfig, TrainConfig
from .distributed import DistInfo, broadcast_object
from .fileio import atomic_write
from .models import create_model
from .optim import NS_DTYPES, build_optimizer
from .step import timing_parts, train_step
from .system import PRECISION_NAMES, cpu_name, cuda_has_bf16, flush_denormals, resolve_amp, resolve_device

CACHE_PATH = Path(".preactresnet") / "precision.json"
CACHE_ENV = "PREACTRESNET_PRECISION_CACHE"  # another cache file (shared by runs in different folders, as the tests do)
CACHE_FORMAT = 1
MAX_TIMED_BATCH = 128  # larger batches cost the same per image; the full-width net at 256 would take minutes
MIN_SECONDS, MIN_CALLS, MAX_CALLS = 0.6, 2, 20  # per candidate, after one untimed warm-up call
GIVE_UP_FACTOR = 3.0  # a candidate whose warm-up is this much slower than the best one's is not timed further
PROBE_BATCH = 16  # bf16 is first tried on this batch: emulated (3x+ slower), it never runs the full one (5 s on AVX2)


def measure(candidates: dict[str, Callable[[], None]], clock=time.perf_counter) -> dict[str, float]:
    """Seconds per call of each candidate: one untimed warm-up call, then calls until MIN_SECONDS and
    MIN_CALLS are reached. A candidate far slower than the best already timed is judged on its warm-up."""
    seconds: dict[str, float] = {}
    for name, call in candidates.items():
        start = clock()
        call()
        warmup = clock() - start
        if seconds and warmup > GIVE_UP_FACTOR * max(min(seconds.values()), 1e-9):
            seconds[name] = warmup  # clearly slower; its warm-up overstates it a little, which changes nothing
            continue
        calls, start = 0, clock()
        while calls < MIN_CALLS or (clock() - start < MIN_SECONDS and calls < MAX_CALLS):
            call()
            calls += 1
        seconds[name] = (clock() - start) / calls
    return seconds


def amp_candidates(cfg: TrainConfig, num_classes: int, channels_last: bool, batch: int | None = None) -> tuple[dict, int]:
    """Forward and backward of this run's network on a batch of its shape (or `batch`), in fp32 ('off') and in bf16."""
    batch = min(batch or cfg.batch_size, MAX_TIMED_BATCH)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=num_classes, width_mult=cfg.width_mult).to(memory_format=fmt).train()
    x = torch.randn(batch, 3, 32, 32).to(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,))

    def step(dtype):  # the training loop's own step (step.train_step); SGD at lr 0 leaves the weights as they are
        parts = timing_parts(model, model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"), dtype, num_classes)
        return lambda: train_step(parts, x.to(dtype or torch.float32), y, 1)

    return {"off": step(None), "bf16": step(torch.bfloat16)}, batch


def bf16_far_slower(cfg: TrainConfig, num_classes: int, channels_last: bool, clock) -> float | None:
    """bf16's images/s on a PROBE_BATCH when it is GIVE_UP_FACTOR times slower than fp32 there (emulated), else None."""
    candidates, batch = amp_candidates(cfg, num_classes, channels_last, batch=PROBE_BATCH)
    seconds = {}
    for name, call in candidates.items():
        call()  # untimed: first-touch allocations and kernel choice
        start = clock()
        call()
        seconds[name] = clock() - start
    return batch / seconds["bf16"] if seconds["bf16"] > GIVE_UP_FACTOR * seconds["off"] else None


def amp_figures(cfg: TrainConfig, num_classes: int, channels_last: bool, clock) -> dict[str, float]:
    """Images/s of forward and backward per precision; bf16 judged on the probe alone where it is far slower."""
    slow = bf16_far_slower(cfg, num_classes, channels_last, clock)
    candidates, batch = amp_candidates(cfg, num_classes, channels_last)
    if slow is not None:
        del candidates["bf16"]
    figures = {name: round(batch / s, 1) for name, s in measure(candidates, clock).items()}
    return figures if slow is None else {**figures, "bf16": round(slow, 1)}


def ns_candidates(cfg: TrainConfig, num_classes: int) -> dict:
    """Muon's whole optimizer step on this network's parameters, orthogonalizing in fp32, bf16 and bf16's Gram form."""
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=num_classes, width_mult=cfg.width_mult)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def step(name):
        optimizer = build_optimizer(dataclasses.replace(cfg, muon_ns_dtype=name), model)
        return optimizer.step

    return {name: step(name) for name in NS_DTYPES}


def machine_key(machine: str) -> str:
    """The part of a timing's cache key every timing shares: machine, threads, PyTorch and its kernel set."""
    kernels = f"{torch.backends.cpu.get_cpu_capability()}/onednn={os.environ.get('ONEDNN_MAX_CPU_ISA', 'default')}"
    return f"{machine} | threads={torch.get_num_threads()} | torch {torch.__version__.split('+')[0]} {kernels}"


def cache_key(cfg: TrainConfig, num_classes: int, channels_last: bool) -> str:
    """Everything the figures depend on: machine, threads, PyTorch and its kernel set, model shape."""
    shape = f"{cfg.model} x{cfg.width_mult:g} classes={num_classes} batch={min(cfg.batch_size, MAX_TIMED_BATCH)}"
    layout = "channels_last" if channels_last else "NCHW"
    return f"{machine_key(cpu_name())} | {shape} {layout}"


def cache_path() -> Path:
    """Where timed figures are kept: $PREACTRESNET_PRECISION_CACHE if set, else .preactresnet/precision.json here."""
    return Path(os.environ.get(CACHE_ENV) or CACHE_PATH)


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data["entries"] if data.get("format") == CACHE_FORMAT else {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {}  # none yet, or unreadable: measure again and rewrite it


def write_cache(path: Path, key: str, entry: dict) -> None:
    entries = {**read_cache(path), key: entry}
    text = json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text))


BF16_MUST_WIN_BY = 1.05  # bf16 rounds: it is chosen only when it is clearly faster, not within timing noise


def timed_figures(cfg: TrainConfig, num_classes: int, channels_last: bool, wanted: tuple, clock, path: Path) -> tuple[dict, str]:
    """{'amp': images/s per precision, 'ns': ms per Muon step per dtype} for `wanted`, from the cache or timed now."""
    key = cache_key(cfg, num_classes, channels_last)
    entry = read_cache(path).get(key, {})
    missing = [w for w in wanted if w not in entry or (w == "ns" and set(entry["ns"]) != set(NS_DTYPES))]  # a new candidate
    if not missing:
        return entry, f"cached in {path}, timed {entry.get('measured', '?')}"
    if "amp" in missing:
        entry["amp"] = amp_figures(cfg, num_classes, channels_last, clock)
    if "ns" in missing:
        entry["ns"] = {name: round(1000 * s, 2) for name, s in measure(ns_candidates(cfg, num_classes), clock).items()}
    entry["measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_cache(path, key, entry)
    return entry, f"timed here, cached in {path}"


def choose(figures: dict, wanted: tuple) -> dict:
    """The settings the figures call for: bf16 only where it is clearly the faster."""
    chosen = {}
    if "amp" in wanted:
        ips = figures["amp"]
        chosen["amp"] = "bf16" if ips["bf16"] >= BF16_MUST_WIN_BY * ips["off"] else "off"
    if "ns" in wanted:
        ms = figures["ns"]
        bf16 = min(("bf16", "bf16-gram"), key=ms.get)
        chosen["muon_ns_dtype"] = bf16 if BF16_MUST_WIN_BY * ms[bf16] <= ms["fp32"] else "fp32"
    return chosen


def describe(chosen: dict, figures: dict, source: str) -> str:
    parts = []
    if "amp" in chosen:
        ips = figures["amp"]
        name = "bf16 autocast" if chosen["amp"] == "bf16" else "fp32"
        parts.append(f"{name} (fp32 {ips['off']:.0f} vs bf16 {ips['bf16']:.0f} images/s, forward+backward)")
    if "muon_ns_dtype" in chosen:
        ms = figures["ns"]
        timed = " vs ".join(f"{name} {ms[name]:.1f}" for name in ms)
        parts.append(f"Muon orthogonalizing in {chosen['muon_ns_dtype']} ({timed} ms/step)")
    return f"precision auto: {'; '.join(parts)}; {source}"


def gpu_rule(wanted: tuple, device: torch.device) -> dict:
    """On a GPU: bf16 from compute capability 8.0 (A100, H100, RTX 30xx on), else fp16 autocast and fp32 Muon."""
    chosen = {}
    if "amp" in wanted:
        chosen["amp"] = PRECISION_NAMES[resolve_amp("auto", device)]
    if "ns" in wanted:
        chosen["muon_ns_dtype"] = "bf16" if cuda_has_bf16(device) else "fp32"
    return chosen


def resolve_precision(run: ResolvedConfig, dist: DistInfo, num_classes: int, channels_last: bool,
                      clock=time.perf_counter, path: Path | None = None) -> ResolvedConfig:
    """The run with 'auto' precisions replaced by what was chosen, and the line saying why (`run.precision_line`).
    A resumed run keeps what it was saved with; explicit settings (flags, YAML, a system profile) win. Denormals are
    flushed first (--flush-denormal), before a timing starts torch's threads: they inherit it."""
    cfg = run.cfg
    flush_denormals(cfg.flush_denormal)
    wanted = tuple(w for w, auto in (("amp", cfg.amp == "auto"), ("ns", cfg.optimizer == "muon" and cfg.muon_ns_dtype == "auto")) if auto)
    if run.state is not None or not wanted:
        return run
    chosen, line = decide(cfg, wanted, num_classes, channels_last, clock, path) if dist.is_main else (None, None)
    chosen, line = broadcast_object((chosen, line), dist)  # rank 0 decided (timed on a CPU): every rank trains alike
    return dataclasses.replace(run, cfg=dataclasses.replace(cfg, **chosen), precision_line=line)


def decide(cfg: TrainConfig, wanted: tuple, num_classes: int, channels_last: bool, clock=time.perf_counter,
           path: Path | None = None) -> tuple[dict, str]:
    """The settings for `wanted` ('amp', 'ns') on this machine, and the line saying why: a GPU's by its
    compute capability, a CPU's timed (or read from the cache). train.py and optimize_system.py share it."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        chosen = gpu_rule(wanted, device)
        return chosen, "precision auto on a GPU: " + ", ".join(f"{k} {v}" for k, v in chosen.items()) + " (bf16 from compute capability 8.0)"
    figures, source = timed_figures(cfg, num_classes, channels_last, wanted, clock, path or cache_path())
    chosen = choose(figures, wanted)
    return chosen, describe(chosen, figures, source)


__all__ = ["CACHE_ENV", "CACHE_PATH", "cache_path", "choose", "decide", "measure", "resolve_precision", "timed_figures"]
