"""--time-budget: durations, the plan, the one-line errors, and the resume rule."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_training import interrupt_at, run_args, trainer

import preactresnet.budget as budget
import preactresnet.training.parts as parts
from preactresnet.budget import BudgetPlan, Calibration, parse_duration, plan
from preactresnet.checkpoint import load_state
from preactresnet.cli import main_train


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400),
                                           ("1m30s", 90), ("45", 45), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "0s", "m", "1h-5m", "ten minutes"])
def test_bad_durations_name_the_fix(text):
    with pytest.raises(ValueError, match="--time-budget"):
        parse_duration(text)


def test_plan_fills_the_budget_with_steps_and_evaluations():
    cal = Calibration(seconds_per_step=0.2, eval_seconds=1.0, batch_size=128)
    p = plan(60.0, steps_per_epoch=78, cal=cal)
    assert p.epochs == 4 and p.total_steps == 280  # 3 whole epochs and 46 steps of a 4th, 4 evaluations
    assert p.expected_seconds == pytest.approx(60.0, abs=0.2) and p.expected_seconds <= 60.0
    assert plan(3600, 78, cal).total_steps > 60 * 78, "long budgets give many epochs"


def test_a_short_budget_spends_less_of_itself_on_calibration():
    assert [budget.timed_seconds(b) for b in (5, 10, 40, 70, 900)] == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_budget_shorter_than_an_epoch_trains_part_of_one():
    cal = Calibration(seconds_per_step=0.2, eval_seconds=1.0, batch_size=128)  # one epoch: 16.6 s
    p = plan(10.0, 78, cal)
    assert (p.epochs, p.total_steps) == (1, 45) and p.expected_seconds <= 10.0  # 45 steps and one evaluation
    assert plan(2.0, 78, cal).total_steps == 5, "5 steps and an evaluation: the least a budget may hold"
    with pytest.raises(ValueError, match=r"fewer than 5 steps here .*give at least 2s"):
        plan(1.9, 78, cal)


def test_budget_and_epochs_flags_together_are_one_line_errors(tmp_path, capsys):
    for flags in (["--time-budget", "60s", "--epochs", "3"], ["--time-budget", "10m", "--total-steps", "9"],
                  ["--time-budget", "soon"]):
        with pytest.raises(SystemExit) as exc:
            main_train(run_args(tmp_path, *flags))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and "--time-budget" in err, err


def _fixed_calibration(monkeypatch, calls: list):
    def fake(t, seconds_wanted=None):
        calls.append(t)
        t.train_loader.set_epoch(0)
        t.train_steps(2)  # real steps on the throwaway trainer: they must not leak into the run
        return Calibration(seconds_per_step=1.0, eval_seconds=2.0, batch_size=t.cfg.batch_size)

    monkeypatch.setattr(budget, "calibrate", fake)


@pytest.mark.slow(9)
def test_budget_run_equals_explicit_steps_and_resumes_without_recalibrating(tmp_path, monkeypatch):
    calls = []
    _fixed_calibration(monkeypatch, calls)
    common = ["--max-steps-per-epoch", "4", "--deterministic", "--tta", "none"]
    # 15 s at 1 s/step + 2 s/evaluation: 9 steps (4 + 4 + 1) and 3 evaluations
    t = trainer(tmp_path, *common, "--time-budget", "15s", "--run-name", "budget")
    assert len(calls) == 1 and (t.cfg.epochs, t.cfg.total_steps) == (3, 9)
    t.fit()
    trainer(tmp_path, *common, "--epochs", "3", "--total-steps", "9", "--run-name", "explicit").fit()
    cut = trainer(tmp_path, *common, "--time-budget", "15s", "--run-name", "cut")
    interrupt_at(cut, 5)
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = trainer(tmp_path, "--resume", "cut", "--checkpoint-dir", str(tmp_path / "ck"), "--epochs", "200")
    assert len(calls) == 2 and resumed.cfg.total_steps == 9, "a resumed budget run is never calibrated again"
    resumed.fit()
    ref = load_file(tmp_path / "ck" / "explicit" / "last.safetensors")
    for run in ("budget", "cut"):
        w = load_file(tmp_path / "ck" / run / "last.safetensors")
        assert all(torch.equal(ref[k], w[k]) for k in ref), run
        assert load_state(tmp_path / "ck" / run / "last.state.pt")["step"] == 9
    rows = list(csv.DictReader(open(tmp_path / "runs" / "cut" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["4", "8", "9"] and rows[-1]["budget_total_steps"] == "9"
    assert float(rows[0]["time_budget_s"]) == 15.0 and float(rows[0]["calibrated_images_per_sec"]) == 32.0


@pytest.mark.slow(5)
def test_an_epoch_inside_the_warmup_refits_the_plan_to_the_measured_speed(tmp_path, monkeypatch):
    """Calibration said 1 s/step; the first epoch (all of it warmup) measured 0.5 s/step and 1 s per evaluation:
    the plan grows from 5 steps to 12, once, and the run equals one given those epochs and steps explicitly."""
    calls, seen = [], []
    _fixed_calibration(monkeypatch, calls)

    def fake_measured(t, stats, eval_seconds):
        seen.append((t.step, stats.steps))
        return Calibration(seconds_per_step=0.5, eval_seconds=1.0, batch_size=t.cfg.batch_size)

    monkeypatch.setattr(parts, "measured", fake_measured)
    common = ["--max-steps-per-epoch", "4", "--deterministic", "--warmup-epochs", "1"]
    t = trainer(tmp_path, *common, "--time-budget", "9s", "--run-name", "budget")
    assert (t.cfg.epochs, t.cfg.total_steps) == (2, 5)
    t.fit()
    assert seen == [(4, 4)], "refitted once, at the end of the first epoch: the warmup's last step"
    # 9 s at 0.5 s/step + 1 s/evaluation: 12 steps (3 epochs of 4) and 3 evaluations
    trainer(tmp_path, *common, "--epochs", "3", "--total-steps", "12", "--run-name", "explicit").fit()
    ref, got = (load_file(tmp_path / "ck" / run / "last.safetensors") for run in ("explicit", "budget"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    state = load_state(tmp_path / "ck" / "budget" / "last.state.pt")
    assert state["step"] == 12 and state["config"]["total_steps"] == 12
    saved = yaml.safe_load((tmp_path / "ck" / "budget" / "config.yaml").read_text())
    assert (saved["epochs"], saved["total_steps"]) == (3, 12), "config.yaml (read by export) gives the refitted plan"
    rows = list(csv.DictReader(open(tmp_path / "runs" / "budget" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["4", "8", "12"] and rows[0]["budget_total_steps"] == "12"
    assert float(rows[0]["calibrated_images_per_sec"]) == 64.0, "the speed the plan now rests on"


def test_a_refit_never_ends_before_the_steps_taken():
    slow = Calibration(10.0, 5.0, 128)  # one epoch of 78 steps takes 785 s here: a 60 s budget is spent
    assert (lambda p: (p.epochs, p.total_steps))(budget.refit(60.0, 78, slow, 78)) == (1, 78)
    fast = Calibration(0.1, 1.0, 128)
    assert budget.refit(60.0, 78, fast, 78).total_steps == plan(60.0, 78, fast).total_steps > 78


def test_plan_record_names_the_choice():
    p = BudgetPlan(60.0, 4, 280, 78, Calibration(0.2, 1.0, 128))
    assert p.as_record()["budget_epochs"] == pytest.approx(280 / 78, abs=1e-3)
