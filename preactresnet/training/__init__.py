"""Training: one run of the spec's recipe, with exact resume, atomic checkpoints, TensorBoard, CSV and curves.

    loop.py      Trainer: from_config resolves the run once, fit -> run_epoch -> train_steps -> _step
    step.py      one optimizer step (train_step) and the parts it uses (StepParts)
    resolve.py   the config resolved once: flags, YAML, a resumed run's saved config, the system profile
    parts.py     building the parts in a fixed order: process, data, model, optimization
    state.py     Checkpointer: the run's files, given what they hold (each object through its own state_dict)
    runlog.py    RunLog: console, metrics.csv, TensorBoard, figures, the final report (rank 0 only), given its values
    stopping.py  StopControl (signals, the ranks' agreement), what a stop raises, the resume hint

`train(cfg)` and `Trainer.from_config(cfg).fit()` are the public entry points.
"""

from ..optim import build_mixup, build_optimizer, build_scheduler
from .loop import Trainer, train
from .parts import check_total_steps, use_channels_last
from ..evaluation import EpochEval
from .runlog import NullWriter, RunDirs, StepStats
from .stopping import NonFiniteLoss, StopControl, Stopped, resume_command

__all__ = [
    "EpochEval", "NonFiniteLoss", "NullWriter", "RunDirs", "StepStats", "StopControl", "Stopped", "Trainer", "build_mixup",
    "build_optimizer", "build_scheduler", "check_total_steps", "resume_command", "train", "use_channels_last",
]
