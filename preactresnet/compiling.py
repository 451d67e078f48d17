"""--compile auto: a --time-budget run compiles its step with torch.compile only where the steps it gains repay the
compilation within the budget, as measured on this machine and cached beside the precision figures.

With figures cached (eager and compiled seconds per step, and the compilation's seconds), the budget B decides:
compile when (B - compile seconds) / compiled step >= MARGIN x B / eager step. Without them, a budget of at least
MEASURE_FROM times both (its calibration compiles once) and caches what it found; a shorter budget stays eager: a
first compilation costs 20-90 s on a 2-core CPU, more than it could give back. A compiled run's budget is charged
with the compilation it paid, so it still ends on time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from .config import TrainConfig
from .distributed import DistInfo
from .precision import cache_path, machine_key, read_cache, write_cache
from .system import cpu_name

MARGIN = 1.03  # compiled must give 3% more steps in the budget: below that the noise between two runs is larger
MEASURE_FROM = 600.0  # seconds of budget from which a first compilation is worth measuring (under 15% of it)


@dataclass(frozen=True)
class Timing:
    """One calibration: seconds per step, of an evaluation, and of the untimed warm-up steps (a compilation's)."""

    seconds_per_step: float
    eval_seconds: float
    warmup_seconds: float
    warmup_steps: int

    @property
    def compile_seconds(self) -> float:  # the warm-up beyond its steps' own time: compiling (0 when eager)
        return max(0.0, self.warmup_seconds - self.warmup_steps * self.seconds_per_step)


@dataclass(frozen=True)
class Choice:
    compiled: bool
    timing: Timing  # the chosen step's calibration
    charged: float  # seconds of compilation taken from the budget
    line: str | None  # what was chosen and why (None: --compile on/off as given)


def cache_key(cfg: TrainConfig, device: torch.device) -> str:
    """Everything the figures depend on: machine, threads, PyTorch and kernels, model, batch, precision, optimizer."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    shape = f"{cfg.model} x{cfg.width_mult:g} batch={cfg.batch_size} amp={cfg.amp} {cfg.optimizer} channels_last={cfg.channels_last}"
    return f"compile | {machine_key(machine)} | {shape}"


def worth_compiling(budget: float, eager: float, compiled: float, compile_seconds: float) -> bool:
    """Whether the steps a compiled run fits in `budget` (after compiling) beat the eager run's by MARGIN."""
    return (budget - compile_seconds) / compiled >= MARGIN * budget / eager


def why_not_auto(cfg: TrainConfig, dist: DistInfo) -> str | None:
    if dist.enabled:
        return "it decides for one process (DDP's hooks were not timed); --compile on compiles under torchrun"
    if cfg.deterministic:
        return "--deterministic runs stay eager"
    return None


def choose(cfg: TrainConfig, dist: DistInfo, device: torch.device, budget: float, timed: Callable[[bool], Timing]) -> Choice:
    """Compile or not for a --time-budget run of `budget` seconds; `timed(compiled)` calibrates that step."""
    if cfg.compile != "auto":
        timing = timed(cfg.compile == "on")
        return Choice(cfg.compile == "on", timing, timing.compile_seconds if cfg.compile == "on" else 0.0, None)
    if reason := why_not_auto(cfg, dist):
        return Choice(False, timed(False), 0.0, f"--compile auto: eager ({reason})")
    path, key = cache_path(), cache_key(cfg, device)
    figures = read_cache(path).get(key)
    if figures is None and budget < MEASURE_FROM:
        return Choice(False, timed(False), 0.0, f"--compile auto: eager (a budget under {MEASURE_FROM / 60:.0f} min cannot "
                      "repay a first compilation here; a longer one measures and caches it; --compile on forces it)")
    if figures is None:
        return _measure(budget, timed, path, key)
    use = _worth(budget, figures)
    timing = timed(use)
    return Choice(use, timing, timing.compile_seconds if use else 0.0,
                  _line(use, figures, budget, f"cached in {path}, timed {figures['measured']}"))


def _measure(budget: float, timed: Callable[[bool], Timing], path, key: str) -> Choice:
    """Time both steps (compiling once), cache the figures, choose."""
    eager, compiled = timed(False), timed(True)
    figures = {"eager": eager.seconds_per_step, "compiled": compiled.seconds_per_step, "compile_seconds": compiled.compile_seconds,
               "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_cache(path, key, figures)
    use = _worth(budget, figures)
    return Choice(use, compiled if use else eager, compiled.compile_seconds if use else 0.0,
                  _line(use, figures, budget, f"timed here, cached in {path}"))


def _worth(budget: float, figures: dict) -> bool:
    return worth_compiling(budget, figures["eager"], figures["compiled"], figures["compile_seconds"])


def _line(use: bool, figures: dict, budget: float, where: str) -> str:
    return (f"--compile auto: {'compiled' if use else 'eager'} (a step {1000 * figures['eager']:.0f} ms eager, "
            f"{1000 * figures['compiled']:.0f} ms compiled after {figures['compile_seconds']:.0f} s of compiling: "
            f"{'worth' if use else 'not worth'} it in {budget / 60:g} min; {where})")
