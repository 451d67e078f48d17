"""The system profile: optimize_system.py's measured settings, tied to the machine that measured them.

train.py applies a profile only on the machine (CPU, cores, PyTorch, device) and the model it was
made for; every setting the user gives explicitly wins over it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from .fileio import atomic_write
from .system import cpu_name

PROFILE_PATH = Path(".preactresnet") / "system_profile.json"
PROFILE_FORMAT = 1
# Settings a profile may choose; anything the user sets explicitly wins over it.
PROFILE_KEYS = ("amp", "channels_last", "threads", "compile", "muon_ns_dtype")


def machine_fingerprint(device: torch.device) -> dict:
    fp = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__.split("+")[0], "device": device.type}
    if device.type == "cuda":
        fp["gpu"] = torch.cuda.get_device_name(device)
    return fp


def to_train_settings(row: dict) -> dict:
    """The winning row as train.py settings (tf32 is fp32 math with TF32 matmuls: applied by train.py on GPU)."""
    return {
        "amp": "off" if row["amp"] in ("fp32", "tf32") else row["amp"],
        "channels_last": row["channels_last"],
        "threads": int(row.get("threads") or 0),
        "compile": bool(row["compile"]),
    }


def write_profile(path: Path, device: torch.device, model: str, batch: int, rows: list[dict], width_mult: float = 1.0,
                  extra: dict | None = None) -> dict:
    """Save the fastest row (and `extra` settings measured apart, Muon's orthogonalization dtype);
    `width_mult` and `batch` are what was timed (--quick times a narrower net)."""
    best = max(rows, key=lambda r: r["images_per_sec"])
    profile = {
        "format": PROFILE_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_fingerprint(device),
        "model": model,
        "width_mult": width_mult,
        "batch_size": batch,
        "world_size": 1,  # optimize_system.py times one process: a --compile chosen here is not applied under torchrun
        "settings": {**to_train_settings(best), **(extra or {})},
        "tf32": best["amp"] == "tf32",
        "cudnn_benchmark": bool(best.get("cudnn_benchmark", False)),
        "measured": rows,
    }
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(profile, indent=2) + "\n"))
    return profile


def load_profile(spec: str, model: str, device: torch.device, warn=print, shape: tuple | None = None) -> dict | None:
    """The profile train.py should apply, or None (off, missing, or made on another machine or model).
    `shape` (width_mult, batch_size) of the run: a profile timed at another one is applied with a warning."""
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
    timed = (profile.get("width_mult", 1.0), profile.get("batch_size"))
    if shape is not None and timed != tuple(shape):
        warn(f"warning: system profile {path} was timed on {model} width x{timed[0]} at batch {timed[1]}, this run is "
             f"x{shape[0]} at batch {shape[1]}; its settings may not be the fastest here: python optimize_system.py "
             f"--model {model} --width-mult {shape[0]} --batch-size {shape[1]}")
    return {**profile, "path": str(path), "settings": {k: settings[k] for k in PROFILE_KEYS if k in settings}}
