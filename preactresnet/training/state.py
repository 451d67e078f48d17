"""The training state: `Checkpointer` writes a run's files, given what they hold (timm's CheckpointSaver is the
model): best weights (when the epoch improved), `last.state.pt` (each object through its own state_dict), last and
EMA weights, in that order, each replaced atomically; and loads them back into its objects for an exact resume
(writing the last and EMA weights again where a kill left them behind the state). It keeps the best epoch's score, as
timm's does. `run_record` is the run's own values in that state; `Resumed` reads them back, `resumed_meta` the command
and machines its weights name; `starting_point` is what the time budget's calibration starts over from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone

from ..checkpoint import CheckpointError, WeightsMeta, rank_state, read_metadata, save_state, save_weights
from ..config import ResolvedConfig
from ..fileio import first_line
from ..plan import RunPlan
from ..distributed import DistInfo, gather_objects
from ..system import PRECISION_NAMES, rng_state, set_rng_state
from ..evaluation import EpochEval
from .runlog import RunDirs, StepStats
from ..step import StepParts


LAST_FILES = ("last.safetensors", "ema.safetensors")  # the weights save_last writes after the state


class Checkpointer:
    """Saves and loads what it was given: the model, optimizer, gradient scaler, EMA and Lookahead of a step's parts, and the
    training loader; it keeps the best epoch's score (on the split that chooses it) and that epoch."""

    def __init__(self, dirs: RunDirs, dist: DistInfo, meta: WeightsMeta, parts: StepParts, loader):
        self.dirs, self.dist, self.meta = dirs, dist, meta
        self.model, self.optimizer, self.scaler, self.ema, self.loader = parts.model, parts.optimizer, parts.scaler, parts.ema, loader
        self.lookahead = parts.lookahead
        self.best_metric, self.best_epoch = -1.0, -1
        self.mended = ""  # what a resume wrote again (mend_last_weights)

    def save_epoch(self, epoch: int, ev: EpochEval | None, record: dict, plan: dict | None) -> None:
        """After `epoch` epochs: best.safetensors if the chosen split improved, then the state and last weights. Best
        first: a kill between them leaves the last epoch's state, whose resume trains this epoch again and writes both;
        the other order left a finished state naming a best epoch that best.safetensors never held. `ev` None: not
        evaluated, no best to judge. `plan`: the length a time budget chose, for the metadata."""
        if ev is not None:
            accuracy, weights, accuracies, split = self.judge(ev)
            if accuracy > self.best_metric:
                self.best_metric, self.best_epoch = accuracy, epoch
                self.save_best(epoch, weights, accuracies, split, plan, record)
        self.save_last(epoch, record, plan)

    def save_last(self, epoch: int, record: dict, plan: dict | None) -> None:
        """State, then last weights, then EMA weights (after best). Every rank takes part (each contributes its
        own loader position and random streams); rank 0 writes. `record`: the run's own values (run_record)."""
        ranks = gather_objects({"loader": self.loader.state_dict(), "rng": rng_state()}, self.dist)
        if not self.dist.is_main:
            return
        state = {
            "format": 2, "epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None, "world_size": self.dist.world_size,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "ranks": ranks,  # each rank's loader position and random streams, in rank order
            "best_metric": self.best_metric, "best_epoch": self.best_epoch, **record,
        }
        save_state(self.dirs.checkpoints / "last.state.pt", state)
        self.save_last_weights(epoch, record, plan)

    def save_last_weights(self, epoch: int, record: dict, plan: dict | None, files=LAST_FILES, meta: WeightsMeta | None = None):
        """Those of last.safetensors and ema.safetensors in `files`, of the weights the state holds (rank 0 only);
        `meta`: the run's description they carry (this Checkpointer's unless given)."""
        meta, last = meta or self.meta, record["history"][-1] if record["history"] else {}
        last = last if last.get("step") == record["step"] else {}  # a stop mid-epoch: no score of these weights yet
        at = {"plan": plan, "training": trained(epoch, record)}
        if LAST_FILES[0] in files:
            save_weights(self.dirs.checkpoints / LAST_FILES[0], self.model.state_dict(),
                         meta.at(epoch, test_accuracy=last.get("test_acc"), **at))
        if self.ema is not None and LAST_FILES[1] in files:
            save_weights(self.dirs.checkpoints / LAST_FILES[1], self.ema.module.state_dict(),
                         meta.at(epoch, ema=True, test_accuracy=last.get("ema_test_acc"), **at))

    def judge(self, ev: EpochEval) -> tuple[float, object, dict, str]:
        """The split that chooses the best epoch (validation if held out, else test) and the weights it chose:
        raw or EMA, whichever is better on validation (never judged on test). Returns the accuracy that counts,
        the module, its accuracies for the metadata and the split's name."""
        chosen, key, split = (ev.val, "val", "validation") if ev.val is not None else (ev.test, "test", "test")
        weights, test = self.model, ev.test
        if ev.ema_val is not None and ev.ema_val.accuracy > ev.val.accuracy:
            chosen, weights, test = ev.ema_val, self.ema.module, ev.ema_test
        return chosen.accuracy, weights, {f"{key}_accuracy": chosen.accuracy, "test_accuracy": test.accuracy}, split

    def save_best(self, epoch: int, weights, accuracies: dict, split: str, plan: dict | None, record: dict) -> None:
        if self.dist.is_main:
            meta = self.meta.at(epoch, ema=weights is not self.model, selected_on=split, plan=plan,
                                training=trained(epoch, record), **accuracies)
            save_weights(self.dirs.checkpoints / "best.safetensors", weights.state_dict(), meta)

    def load(self, state: dict, device_type: str, classes: list, steps_per_epoch: int, run_dir) -> bool:
        """Every object back as saved, on the data it was trained on; returns whether the state was saved on this
        device type (else the loader is re-seeded at its epoch's start: another device's generator cannot continue)."""
        check_same_data(state, classes, steps_per_epoch, run_dir)
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        self.model.load_state_dict(state["model"])
        saved = state["optimizer"]
        kernels = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in self.optimizer.param_groups]
        # this device's kernels, not the saving run's (a GPU's fused=True on a CPU), set before loading: torch
        # places each 'step' counter for the kernels of its group (fused: on the parameter's device)
        groups = [{**group, **mine} for group, mine in zip(saved["param_groups"], kernels)]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.module.load_state_dict(state["ema"])
        if self.lookahead is not None and state.get("lookahead") is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        mine = rank_state(state, self.dist.rank)
        same_device = state.get("device_type", device_type) == device_type
        self.loader.load_state_dict(mine["loader"], generator=same_device)
        set_rng_state(mine["rng"])
        self.mend_last_weights(state)
        return same_device

    def mend_last_weights(self, state: dict) -> None:
        """A kill between the state and the last or EMA weights (save_last) left those a save behind it (or they were
        deleted): written again from the state just loaded, as save_last would have, naming the machine that trained
        them; a finished run's resume trains nothing, so they would stay behind. Rank 0 writes; `mended` says what."""
        files = LAST_FILES if self.ema is not None and state.get("ema") is not None else LAST_FILES[:1]
        known = self.dist.is_main and "spent_seconds" in state  # a state older than the run's clock: minutes unknown
        behind = [f for f in files if _behind(self.dirs.checkpoints / f, state)] if known else []
        if not behind:
            return
        plan = RunPlan.from_state(state["plan"]).length() if state.get("budget") else None  # as save_epoch was given it
        meta, names = replace(self.meta, machine=state.get("machine") or self.meta.machine), " and ".join(behind)
        try:
            self.save_last_weights(int(state["epoch"]), state, plan, behind, meta)
            self.mended = f"; {names} written again from the state (missing, or a kill had left them behind it)"
        except OSError as err:
            self.mended = f"; {names} behind the state and not written again ({first_line(err)}): its weights are in last.state.pt"


def _behind(path, state: dict) -> bool:
    """Whether weights at `path` are missing, unreadable, or from another step than the state's."""
    try:
        meta = read_metadata(path)
    except (CheckpointError, ValueError):  # ValueError: metadata that is not JSON
        return True
    return (meta.get("training") or {}).get("steps", state["step"]) != state["step"] or meta.get("epoch") != state["epoch"]


def check_same_data(state: dict, classes: list, steps_per_epoch: int, run_dir) -> None:
    """--data-dir may move on resume, not change: other classes, or another number of training images (the steps an
    epoch), would continue another run's schedule and image order on data it never planned for."""
    if state["model_args"]["num_classes"] != len(classes) or list(state.get("classes", classes)) != list(classes):
        raise ValueError(f"{run_dir} was trained on the classes {state.get('classes')}, this data has {list(classes)}; "
                         "resume with the --data-dir it was trained on")
    plan = state.get("plan") or {"steps_per_epoch": steps_per_epoch, "total_steps": 0}
    saved, left = plan["steps_per_epoch"], plan["total_steps"] > int(state["step"])  # a finished run only evaluates
    if saved != steps_per_epoch and left:
        raise ValueError(f"{run_dir} was trained at {saved} steps an epoch, this data gives {steps_per_epoch}: another "
                         "training set; resume with the --data-dir it was trained on, or start a new run")


def trained(epoch: int, record: dict) -> dict:
    """What the run had done when its weights were saved, for their metadata and model card: optimizer steps, whole
    epochs, minutes on its clock (training and evaluation, over every resume) and the date (UTC) of the save that made
    them (a state's own, where a resume writes its weights again)."""
    return {"steps": record["step"], "epochs": epoch, "minutes": round(record["spent_seconds"] / 60, 1),
            "date": record.get("date") or today()}


def today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


def run_record(trainer) -> dict:
    """The run's own values in its state (read from the Trainer, never changed here)."""
    t = trainer
    return {
        "config": t.cfg.to_dict(), "step": t.step, "device_type": t.startup.device.type,
        "precision": PRECISION_NAMES[t.startup.amp_dtype],
        "process": t.startup.process,  # the profile's TF32 / cudnn.benchmark, applied again on resume
        "epoch_progress": vars(t.epoch_so_far) if t.epoch_so_far is not None else None,
        "history": t.log.history, "classes": t.data.classes,
        "mean": list(t.data.mean), "std": list(t.data.std), "model_args": t.net.model_args,
        "plan": t.plan.state_dict(),  # the run's length (a time budget's as re-planned so far)
        "budget": t.budget.state_dict() if t.budget is not None else None,
        "spent_seconds": t.clock.spent(),  # a resumed time budget spends only what is left
        "command": t.meta.command, "machine": t.meta.machine,  # what started the run, where it trained (resumed_meta)
        "date": today(),  # the day of this save (UTC), which weights written again from the state carry
    }


RESUMED_ON = "; resumed on "  # between the machines a run trained on, in its weights' metadata


def resumed_meta(meta: WeightsMeta, resolved: ResolvedConfig) -> WeightsMeta:
    """A resumed run's weights name the command that started it, not `--resume`, and every machine it trained on."""
    if resolved.state is None:  # a fresh run: this process's command and machine
        return meta
    saved = resolved.state if "command" in resolved.state else _last_weights_meta(resolved.run_dir)
    machines = (saved.get("machine") or meta.machine).split(RESUMED_ON)
    if meta.machine and meta.machine not in machines:  # whole names: one GPU's name can hold another's
        machines.append(meta.machine)
    return replace(meta, command=saved.get("command") or meta.command, machine=RESUMED_ON.join(machines))


def _last_weights_meta(run_dir) -> dict:
    """A state saved before it kept the command: the run's last weights still name it."""
    try:
        return {} if run_dir is None else read_metadata(run_dir / "last.safetensors")
    except CheckpointError:  # none written yet, or unreadable: this process's
        return {}


@dataclass(frozen=True)
class Resumed:
    """A saved state's counters: where the run stands and what it has done."""

    start_epoch: int
    step: int
    history: list
    epoch_so_far: StepStats | None
    spent_seconds: float

    @classmethod
    def of(cls, state: dict, mid_epoch: bool) -> Resumed:
        history = list(state["history"])
        so_far = StepStats(**state["epoch_progress"]) if state.get("epoch_progress") and mid_epoch else None
        # a state saved before the run's clock was: its last epoch's elapsed seconds and the steps after them
        before = (history[-1]["elapsed_seconds"] if history else 0.0) + (so_far.seconds if so_far is not None else 0.0)
        return cls(int(state["epoch"]), int(state["step"]), history, so_far, state.get("spent_seconds", before))


def resumed_line(state: dict, run_dir, r: Resumed, batch: int, same_device: bool) -> str:
    """What a resumed run says: where it continues (`batch`: the loader's position in its epoch)."""
    where = f"epoch {r.start_epoch + 1}" + (f", batch {batch + 1}" if batch > 0 else "")
    moved = "" if same_device else f" (saved on {state['device_type']}: not bit-identical to staying there)"
    return f"resumed {run_dir} at {where} (step {r.step}){moved}"


@dataclass(frozen=True)
class StartingPoint:
    """The model's weights, the loader's position and the random streams, to start over from (after calibration)."""

    model: dict
    loader: dict
    rng: object  # system.rng_state()

    def restore(self, model, loader) -> None:
        model.load_state_dict(self.model)
        loader.load_state_dict(self.loader)
        set_rng_state(self.rng)


def starting_point(model, loader) -> StartingPoint:
    return StartingPoint({k: v.clone() for k, v in model.state_dict().items()}, loader.state_dict(), rng_state())
