"""Resolving a run once, in a fixed order: the saved state (--resume: the saved config wins), the system
profile, validation, the run name; rank 0's result on every rank. Precision (precision.py) and the time
budget's first plan (Trainer.calibrate_budget) follow in Trainer.from_config."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from ..checkpoint import CheckpointError, find_run, load_state, rank_state
from ..config import RESUMABLE_OVERRIDES, ResolvedConfig, TrainConfig, from_dict
from ..distributed import DistInfo, broadcast_object
from ..optim import muon_algo
from ..plan import RunPlan
from ..profile import load_profile
from ..system import resolve_device


def resolve_config(cfg: TrainConfig, explicit: dict, dist: DistInfo, warn=print) -> ResolvedConfig:
    """Resume (the saved config wins), system profile, validation and run name, once, in that order."""
    state = run_dir = profile = None
    if cfg.resume:
        cfg, state, run_dir = _resumed_config(cfg, explicit)
        _check_resumable(cfg, state, run_dir, dist)
    cfg = cfg.validated()
    if cfg.optimizer == "muon":  # what this timm's Muon cannot do is refused here, before start-up times anything
        muon_algo(cfg)
    if state is not None and cfg.compile == "auto" and (state.get("budget") or {}).get("compiled"):
        cfg = dataclasses.replace(cfg, compile="on")  # the step its budget was planned for, compiled again
    if state is None:  # a resumed run keeps the settings it was saved with
        cfg, profile = _with_profile(cfg, explicit, warn, dist.world_size)
    if not cfg.run_name:
        cfg = dataclasses.replace(cfg, run_name=f"{cfg.model}-{datetime.now():%Y%m%d-%H%M%S}")
    elif state is None:
        _keep_unfinished(Path(cfg.checkpoint_dir) / cfg.run_name)
    cfg, profile = broadcast_object((cfg, profile), dist)  # rank 0's settings on every rank: one run, not several
    return ResolvedConfig(cfg, state, run_dir, profile)


def _resumed_config(cfg: TrainConfig, explicit: dict) -> tuple[TrainConfig, dict, Path]:
    """With --resume, the saved config wins; an explicit flag may only change what cannot alter results."""
    run_dir = find_run(cfg.resume, cfg.checkpoint_dir)
    state, saved = _saved_run(run_dir)
    for key, value in explicit.items():
        if key == "epochs" and saved.time_budget:  # the budget chose the epochs; a recipe's count does not apply
            continue
        if key in RESUMABLE_OVERRIDES:
            setattr(saved, key, value)
        elif value != getattr(saved, key):
            raise ValueError(
                f"--{key.replace('_', '-')} {value!r} differs from {getattr(saved, key)!r} in the run being resumed "
                f"({run_dir}); drop the flag, or start a new run without --resume"
            )
    saved = dataclasses.replace(saved, resume=cfg.resume, run_name=run_dir.name, checkpoint_dir=str(run_dir.parent))
    if state.get("precision"):  # the precision 'auto' chose when the run began, kept on any machine
        saved = dataclasses.replace(saved, amp=state["precision"])
    return saved, state, run_dir


def _saved_run(run_dir: Path, mmap: bool = False) -> tuple[dict, TrainConfig]:
    """A run folder's training state and the config it was saved with (mmap: its tensors left on disk)."""
    state = load_state(run_dir / "last.state.pt", mmap=mmap)
    saved = from_dict({"muon_ns_dtype": "bf16", **state["config"]}, where=f"{run_dir}/last.state.pt")  # bf16: before it was a setting
    return state, saved


def _finished(state: dict, cfg: TrainConfig) -> bool:
    """Nothing left to train in a saved state (a time budget's epochs are its plan's)."""
    epochs = RunPlan.from_state(state["plan"]).epochs if state.get("plan") else cfg.epochs
    return int(state["epoch"]) >= epochs


def _keep_unfinished(run_dir: Path) -> None:
    """A fresh run under a taken --run-name replaces a finished run's folder (a second `make demo`), never
    a run that can still be resumed."""
    try:
        state, saved = _saved_run(run_dir, mmap=True)  # three numbers read; the weights stay on disk
    except (CheckpointError, KeyError, TypeError, ValueError):  # none there, or unreadable: nothing resumable to keep
        return
    if not _finished(state, saved):
        raise ValueError(
            f"{run_dir} holds an unfinished run (stopped at step {int(state['step']):,}, epoch {int(state['epoch']) + 1}): continue "
            f"it with --resume {run_dir}, or start afresh under another --run-name (or delete that folder)"
        )


def _check_resumable(cfg: TrainConfig, state: dict, run_dir: Path, dist: DistInfo) -> None:
    """Refuse, in one line, a resume that could not continue exactly where the run stopped."""
    finished = _finished(state, cfg)  # nothing left to train: only evaluation runs
    saved_world = int(state.get("world_size", dist.world_size))
    if saved_world != dist.world_size and not finished:
        launch = f"torchrun --nproc_per_node={saved_world} train.py" if saved_world > 1 else "python train.py"
        raise ValueError(
            f"{run_dir} was saved by {saved_world} process(es) and this run has {dist.world_size}: another count changes "
            f"the global batch, the schedule and the random streams; resume with {launch} --resume {run_dir}"
        )
    device, saved_device = resolve_device(cfg.device).type, state.get("device_type")
    if cfg.amp == "fp16" and device != "cuda":
        raise ValueError(f"{run_dir} trains in fp16, which needs a CUDA GPU; resume it with --device cuda")
    mid_epoch = int(rank_state(state, 0)["loader"]["batch"]) > 0
    if saved_device and saved_device != device and mid_epoch and not finished:
        raise ValueError(
            f"{run_dir} was saved mid-epoch on {saved_device} and its augmentation stream cannot continue on {device}; "
            f"resume with --device {saved_device} (a state saved at the end of an epoch resumes on any device)"
        )


def _with_profile(cfg: TrainConfig, explicit: dict, warn, world_size: int = 1) -> tuple[TrainConfig, dict | None]:
    """optimize_system.py's measured winner, for every setting the user did not give explicitly."""
    profile = load_profile(cfg.profile, cfg.model, resolve_device(cfg.device), warn=warn, shape=(cfg.width_mult, cfg.batch_size))
    if profile is None:
        return cfg, None
    applied = {k: v for k, v in profile["settings"].items() if k not in explicit}
    if cfg.deterministic:
        applied.pop("compile", None)  # --deterministic always wins over the profile
    timed_world = profile.get("world_size", 1)
    if applied.get("compile") in (True, "on") and world_size != timed_world:  # DDP's hooks and all-reduce were not in the timing
        applied.pop("compile")
        warn(f"warning: system profile {profile['path']} chose --compile timing {timed_world} process(es), this run has "
             f"{world_size}: not applied (pass --compile to use it)")
    try:  # a profile is a file anyone can edit: its values pass the same checks as flags
        profiled = from_dict({**cfg.to_dict(), **applied}, where=profile["path"]).validated()
    except ValueError as err:
        raise ValueError(f"system profile {profile['path']}: {err}; rerun python optimize_system.py or pass --profile off") from None
    return profiled, {**profile, "applied": applied}
