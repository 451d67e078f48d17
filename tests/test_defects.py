"""The small defects a review of the training code found (issue 22), each through real behaviour."""

from __future__ import annotations

import csv
import json
import time

import pytest
import yaml

import preactresnet.training as training
from preactresnet.cli import main_train
from preactresnet.distributed import DistInfo
from preactresnet.profile import write_profile
from test_training import interrupt_at, run_args, trainer


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main_train(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("epochs, total, fits", [("1", "100000", "from 1 to 4"), ("3", "2", "from 9 to 12")])
def test_total_steps_must_end_in_the_last_epoch(tmp_path, capsys, epochs, total, fits):
    """More steps than the epochs hold stopped silently at the epochs' end; fewer than the epochs before the
    last need crashed in islice. Both are one line with the range that fits (4 steps per epoch here)."""
    err = _one_line_error(capsys, run_args(tmp_path, "--epochs", epochs, "--total-steps", total, "--max-steps-per-epoch", "4"))
    assert f"--total-steps {total} does not end in the last of --epochs {epochs}" in err and fits in err, err


def test_a_recipes_total_steps_and_a_time_budget_are_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"total_steps": 40, "epochs": 2}))
    err = _one_line_error(capsys, ["--config", str(recipe), *run_args(tmp_path, "--time-budget", "30s")])
    assert "time_budget and total_steps both set the run's length" in err


def test_log_interval_zero_is_a_one_line_error(tmp_path, capsys):
    assert "--log-interval must be >= 1" in _one_line_error(capsys, run_args(tmp_path, "--log-interval", "0"))


def test_elapsed_seconds_count_the_steps_before_a_mid_epoch_stop(tmp_path):
    """elapsed_seconds (wall time since the run began) can never be less than the epoch's own training
    and evaluation seconds; after a resume in the middle of an epoch it left out the steps before the stop."""
    cut = trainer(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "6", "--deterministic", "--run-name", "cut")
    step = cut._step
    cut._step = lambda x, y: time.sleep(0.3) or step(x, y)  # slow steps before the stop, fast ones after
    interrupt_at(cut, 4)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    trainer(tmp_path, "--resume", "cut", "--checkpoint-dir", str(tmp_path / "ck")).fit()
    (row,) = list(csv.DictReader(open(tmp_path / "runs" / "cut" / "metrics.csv")))
    assert float(row["epoch_seconds"]) >= 1.2, row  # the 4 slow steps are in the epoch's training time
    # (each figure is rounded to 0.01 s in the CSV: their sum may exceed the rounded total by 0.01)
    assert float(row["elapsed_seconds"]) + 0.011 >= float(row["epoch_seconds"]) + float(row["eval_seconds"]), row


@pytest.mark.parametrize("argv0, world, expected", [
    ("train.py", 1, "python train.py"),
    ("/venv/bin/preactresnet-train", 1, "preactresnet-train"),
    ("/repo/train.py", 4, "torchrun --nproc_per_node=2 (and this run's other torchrun options) train.py"),
])
def test_the_resume_hint_names_how_the_run_was_launched(monkeypatch, argv0, world, expected):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert training.resume_command(DistInfo(0, world, 0), argv0) == expected


def test_a_profile_with_a_bad_value_is_a_one_line_error(tmp_path, capsys):
    import torch

    path = tmp_path / "p.json"
    rows = [{"amp": "fp32", "channels_last": "on", "compile": False, "threads": 0, "images_per_sec": 1.0}]
    profile = write_profile(path, torch.device("cpu"), "preactresnet18", 32, rows, 0.125)
    profile["settings"]["threads"] = -3  # an edited file
    path.write_text(json.dumps(profile))
    err = _one_line_error(capsys, run_args(tmp_path, "--profile", str(path), "--epochs", "1"))
    assert f"system profile {path}: --threads must be >= 0" in err and "--profile off" in err, err


def test_start_up_time_is_reported_and_a_resume_that_changes_an_empty_setting_says_so(tmp_path, capsys):
    from preactresnet.config import parse_args

    said = []
    cfg, explicit = parse_args(run_args(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "1", "--run-name", "r"))
    training.Trainer.from_config(cfg, explicit, out=said.append).fit()
    assert any(line.startswith("start-up: ") and "s since the process began" in line for line in said), said
    err = _one_line_error(capsys, run_args(tmp_path, "--resume", "r", "--pretrained", "some/folder"))
    assert "--pretrained 'some/folder' differs from '' in the run being resumed" in err, err


def test_a_state_saved_by_c6701cf_still_resumes(tmp_path, monkeypatch):
    """tests/fixtures/c6701cf/: a run stopped mid-epoch 2 by commit c6701cf's code (tests/fixtures/make_c6701cf.py)."""
    import shutil
    from pathlib import Path

    from preactresnet.checkpoint import load_state
    from preactresnet.config import parse_args

    run = tmp_path / "ck" / "c6701cf"
    shutil.copytree(Path(__file__).parent / "fixtures" / "c6701cf", run)
    monkeypatch.chdir(tmp_path)
    cfg, explicit = parse_args(["--resume", "ck/c6701cf", "--no-progress"])
    t = training.Trainer.from_config(cfg, explicit, out=lambda *a: None)
    assert (t.step, t.start_epoch, t.loaders.train.batch) == (6, 1, 2), "resumed where c6701cf stopped"
    assert t.cfg.optimizer == "sgd" and t.cfg.width_mult == 0.0625 and t.cfg.muon_ns_dtype == "bf16"
    result = t.fit()
    state = load_state(run / "last.state.pt")
    assert (state["step"], state["epoch"]) == (8, 2) and result["final"].total == 2000
    rows = list(csv.DictReader(open(tmp_path / "runs" / "c6701cf" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"], "the saved history goes on"
