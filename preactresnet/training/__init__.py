"""Training: one run of the spec's recipe, with exact resume, atomic checkpoints, TensorBoard, CSV and curves.

    loop.py      Trainer: from_config resolves the run once and builds it; fit -> run_epoch -> train_steps -> _step -> step.train_step
    resolve.py   the config resolved once: flags, YAML, a resumed run's saved config, the system profile
    parts.py     building the parts, each a function returning a record: Startup, Loaders, Network, StepParts
                 (../step.py: one optimizer step, train_step, shared with optimize_system.py and the precision choice)
    state.py     Checkpointer: the run's files, given what they hold (each object through its own state_dict)
    runlog.py    RunLog: console, metrics.csv, TensorBoard, figures, the final report (rank 0 only), given its values
    stopping.py  StopControl (signals, the ranks' agreement), what a stop raises, the resume hint

`train(cfg)` and `Trainer.from_config(cfg).fit()` are the public entry points.
"""

from .loop import Trainer, train
from .stopping import NonFiniteLoss, Stopped, resume_command

__all__ = ["NonFiniteLoss", "Stopped", "Trainer", "resume_command", "train"]
