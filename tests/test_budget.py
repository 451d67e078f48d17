"""--time-budget: durations, the first plan, the closed loop on a clock the test controls, the schedule that
follows the plan, the one-line errors, and resuming a budget run."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from safetensors.torch import load_file
from test_training import interrupt_at, run_args, trainer
from virtual_clock import install

import preactresnet.budget as budget
from preactresnet.budget import Calibration, first_plan, fit_steps, parse_duration
from preactresnet.checkpoint import load_state, read_metadata
from preactresnet.cli import main_train
from preactresnet.config import TrainConfig, parse_args
from preactresnet.optim import build_scheduler
from preactresnet.plan import RunPlan
from preactresnet.training import Trainer


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400),
                                           ("1m30s", 90), ("45", 45), (" 2H ", 7200)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "0s", "m", "1h-5m", "ten minutes"])
def test_bad_durations_name_the_fix(text):
    with pytest.raises(ValueError, match="--time-budget"):
        parse_duration(text)


CFG = TrainConfig(warmup_epochs=0.5)


def test_first_plan_fills_the_budget_with_steps_and_evaluations():
    cal = Calibration(seconds_per_step=0.2, eval_seconds=1.0, batch_size=128)
    p = first_plan(60.0, CFG, 78, cal)
    assert (p.epochs, p.total_steps, p.warmup_steps) == (4, 280, 39)  # 3 whole epochs, 46 steps of a 4th, 4 evaluations
    assert budget.expected_seconds(p.total_steps, 0, 0, 78, cal) == pytest.approx(60.0, abs=0.2)
    assert first_plan(3600, CFG, 78, cal).total_steps > 60 * 78, "long budgets give many epochs"


def test_fit_steps_counts_the_epoch_ends_still_to_come():
    cal = Calibration(seconds_per_step=1.0, eval_seconds=5.0, batch_size=128)
    # mid-epoch at step 15 of 10-step epochs (1 ended): 20 s hold 10 more steps and two evaluations (epochs 2 and 3)
    assert fit_steps(20.0, 15, 1, 10, cal, least=16) == 25
    assert fit_steps(24.0, 15, 1, 10, cal, least=16) == 29, "a third evaluation would leave no step for its epoch"
    assert fit_steps(31.0, 15, 1, 10, cal, least=16) == 31  # 16 steps, 3 evaluations
    assert fit_steps(2.0, 15, 1, 10, cal, least=16) == 16, "out of time: one more step, then the epoch's evaluation"


def test_fit_steps_plans_only_the_evaluations_eval_every_asks_for():
    every = {n: Calibration(1.0, 5.0, 128, end_seconds=0.5, eval_every=n) for n in (0, 1, 2)}
    # epoch ends 2..4 after 1 ended: each has its 0.5 s log and checkpoint; the last evaluates, then every n-th
    assert [every[n].ends_seconds(1, 4) for n in (0, 1, 2)] == [1.5 + 5.0, 1.5 + 15.0, 1.5 + 10.0]  # n=2: ends 2 and 4
    assert every[2].ends_seconds(1, 3) == 1.0 + 10.0, "end 2 (every 2nd) and end 3 (the last)"
    assert every[0].ends_seconds(4, 4) == 0.0
    # 60 s of 10-step epochs at 1 s a step: 4 evaluations of 5 s leave 40 steps; evaluating the last only, 52
    assert fit_steps(60.0, 0, 0, 10, Calibration(1.0, 5.0, 128), least=0) == 40
    assert fit_steps(60.0, 0, 0, 10, every[0], least=0) == 52  # 6 ends' 3 s and one 5 s evaluation
    assert fit_steps(60.0, 0, 0, 10, every[1], least=0) == 38  # 4 ends of 5.5 s


def test_a_short_budget_spends_less_of_itself_on_calibration():
    assert [budget.timed_seconds(b) for b in (5, 10, 40, 70, 900)] == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_budget_shorter_than_an_epoch_trains_part_of_one():
    cal = Calibration(seconds_per_step=0.2, eval_seconds=1.0, batch_size=128)  # one epoch: 16.6 s
    assert (lambda p: (p.epochs, p.total_steps))(first_plan(10.0, CFG, 78, cal)) == (1, 45)
    assert first_plan(2.0, CFG, 78, cal).total_steps == 5, "5 steps and an evaluation: the least a budget may hold"
    with pytest.raises(ValueError, match=r"fewer than 5 steps here .*give at least 2s"):
        first_plan(1.9, CFG, 78, cal)


def _lrs(plan, replans, cfg):
    """The learning rate used by each step of `plan`, re-planned at each (step, total) in `replans`; and the rate
    just before and after each re-plan."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, lrs, jumps, todo = build_scheduler(cfg, opt, plan), [], [], dict(replans)
    sched.step_update(num_updates=0)
    step = 0
    while step < plan.total_steps:
        lrs.append(opt.param_groups[0]["lr"])
        step += 1
        sched.step_update(num_updates=step)
        if step in todo:
            before = opt.param_groups[0]["lr"]
            plan.replan(step, todo.pop(step))
            sched.step_update(num_updates=step)
            jumps.append((before, opt.param_groups[0]["lr"]))
    return lrs, jumps, opt.param_groups[0]["lr"]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_the_schedule_follows_every_replan_continuously_to_its_minimum(schedule):
    cfg = TrainConfig(lr=0.1, warmup_lr=0.001, warmup_epochs=2, min_lr=1e-4, schedule=schedule)
    fixed, _, _ = _lrs(RunPlan.of(cfg, 10, 100), [], cfg)
    # a re-plan inside the warmup (longer), then two after it (shorter, then longer again)
    lrs, jumps, last = _lrs(RunPlan.of(cfg, 10, 100), [(12, 160), (60, 90), (80, 130)], cfg)
    assert len(lrs) == 130 and len(jumps) == 3
    assert all(a == pytest.approx(b, rel=1e-12) for a, b in jumps), "no jump at a re-plan"
    assert lrs[:21] == fixed[:21], "the warmup keeps its length and its rates"
    assert last == pytest.approx(1e-4) and min(lrs) > 1e-4, "the decay ends at the last step, not before"
    steps = [abs(b - a) for a, b in zip(lrs, lrs[1:])]
    assert max(steps) < 0.1 * 0.1, "no step changes the rate by more than a tenth of its peak"


def test_a_first_plan_shorter_than_the_warmup_gets_the_whole_warmup_back():
    """A calibration 8x too slow planned 30 steps, so the warmup of 50 asked for was cut to 7 (a quarter of the run,
    --warmup-max-fraction); the re-plan at step 5 to 200 steps gives it back: the rate rises without a jump to its
    peak at step 50, then decays to its minimum."""
    cfg = TrainConfig(lr=0.1, warmup_lr=0.0, warmup_epochs=5, min_lr=0.0)
    plan = RunPlan.of(cfg, 10, 30)
    assert (plan.warmup_steps, plan.warmup_wanted) == (7, 50)
    lrs, jumps, last = _lrs(plan, [(5, 200)], cfg)
    assert plan.warmup_steps == 50 and len(lrs) == 200 and jumps[0][0] == pytest.approx(jumps[0][1])
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 50 and last == pytest.approx(0.0)
    assert all(b > a for a, b in zip(lrs[:50], lrs[1:51])), "the warmup rises all the way"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)  # a resume rebuilds the schedule from the state
    resumed = build_scheduler(cfg, opt, RunPlan.from_state(plan.state_dict()))
    for step in (5, 20, 50, 120, 199):
        resumed.step_update(num_updates=step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[step], rel=1e-12), step


@pytest.mark.parametrize("fraction, warmup", [(0.25, 25), (0.5, 50), (1.0, 99)])
def test_a_run_shorter_than_its_warmup_still_decays(fraction, warmup):
    """A 100-step run asked for 150 warmup steps (a small budget on a slow CPU): the warmup is cut to
    --warmup-max-fraction of the run (1.0: one step short of its end, the old rule), and the rest decays."""
    cfg = TrainConfig(lr=0.1, warmup_lr=0.0, warmup_epochs=1.5, min_lr=0.0, warmup_max_fraction=fraction)
    plan = RunPlan.of(cfg, 100, 100)
    lrs, _, last = _lrs(plan, [], cfg)
    assert plan.warmup_steps == warmup and lrs.index(max(lrs)) == warmup and last == pytest.approx(0.0)
    assert max(lrs) == pytest.approx(0.1)


def test_a_plan_saved_before_the_warmup_cap_resumes_as_it_was():
    state = RunPlan(10, 30, 29, warmup_wanted=50).state_dict()
    del state["warmup_fraction"]  # a state saved by a version without --warmup-max-fraction
    plan = RunPlan.from_state(state)
    plan.replan(5, 40)
    assert plan.warmup_fraction == 1.0 and plan.warmup_steps == 39


def test_a_fixed_plan_reads_the_schedule_at_the_step_itself():
    plan = RunPlan.of(TrainConfig(epochs=3, warmup_epochs=0.5), 10)
    assert (plan.total_steps, plan.warmup_steps) == (30, 5)
    assert [plan.schedule_step(s) for s in (0, 7, 30)] == [0, 7, 30] and isinstance(plan.schedule_step(7), int)


TINY_EPOCHS = ["--max-steps-per-epoch", "10", "--warmup-epochs", "0.5"]


def _budget_run(tmp_path, monkeypatch, budget_text, name, *extra, calibration=0.5, run=0.5, eval_seconds=1.0, save=0.0,
                lines=None):
    """A budget run on virtual time: steps cost `calibration` s while calibrating, `run(step)` s after it."""
    cost = run if callable(run) else (lambda step: run)
    clock = install(monkeypatch, lambda t: calibration if t.budget is None else cost(t.step),
                    eval_seconds=eval_seconds, save_seconds=save)
    cfg, explicit = parse_args(run_args(tmp_path, *TINY_EPOCHS, *extra, "--time-budget", budget_text, "--run-name", name))
    t = Trainer.from_config(cfg, explicit, out=(lines.append if lines is not None else lambda *a: None))
    return t, clock


def _spent_share(t, tmp_path, name) -> float:
    rows = list(csv.DictReader(open(tmp_path / "runs" / name / "metrics.csv")))
    assert float(rows[-1]["elapsed_seconds"]) == pytest.approx(t.clock.spent(), abs=0.01), "the last row counts everything"
    return float(rows[-1]["elapsed_seconds"]) / float(rows[-1]["time_budget_s"])


@pytest.mark.slow(6)
@pytest.mark.parametrize("calibration", [2.0, 0.125], ids=["calibrated-4x-too-slow", "calibrated-4x-too-fast"])
def test_a_wrong_calibration_costs_one_correction_not_the_run(tmp_path, monkeypatch, calibration):
    lines = []
    t, _ = _budget_run(tmp_path, monkeypatch, "40s", "wrong", calibration=calibration, lines=lines)
    first = t.plan.total_steps
    t.fit()
    ideal = fit_steps(40.0, 0, 0, 10, Calibration(0.5, 1.0, 32), least=0)  # 60 steps, 6 evaluations
    assert first != ideal and abs(t.step - ideal) <= 2, (first, t.step, ideal)
    assert 0.97 <= _spent_share(t, tmp_path, "wrong") <= 1.005
    replans = [x for x in lines if x.startswith("time budget:")]
    assert 1 <= len(replans) <= 3 and ("ahead of" if calibration > 0.5 else "behind") in replans[0], replans
    assert t.step_parts.optimizer.param_groups[0]["lr"] == pytest.approx(t.cfg.min_lr), "the decay ended at the last step"


@pytest.mark.slow(4)
def test_a_slowdown_mid_run_shortens_the_plan(tmp_path, monkeypatch):
    t, _ = _budget_run(tmp_path, monkeypatch, "40s", "slow", run=lambda step: 0.5 if step < 20 else 1.0)
    first = t.plan.total_steps
    t.fit()
    assert t.step < first - 10, (first, t.step)
    assert 0.97 <= _spent_share(t, tmp_path, "slow") <= 1.005
    rows = list(csv.DictReader(open(tmp_path / "runs" / "slow" / "metrics.csv")))
    assert int(rows[-1]["replans"]) >= 1 and float(rows[-1]["planned_images_per_sec"]) == pytest.approx(32.0)
    assert all(float(r["planned_finish_s"]) <= 40.2 for r in rows[2:]), "each epoch shows the finish it plans"


@pytest.mark.slow(4)
def test_a_slow_checkpoint_writer_is_counted(tmp_path, monkeypatch):
    t, _ = _budget_run(tmp_path, monkeypatch, "42s", "slowsave", save=3.0)  # a 3 s state file after every epoch
    t.fit()
    assert 0.97 <= _spent_share(t, tmp_path, "slowsave") <= 1.005
    assert t.step == fit_steps(42.0, 0, 0, 10, Calibration(0.5, 4.0, 32), least=0) == 44  # as if evaluations took 4 s


@pytest.mark.slow(4)
@pytest.mark.parametrize("every", [0, 3])
def test_evaluating_less_often_buys_steps_and_still_spends_the_budget(tmp_path, monkeypatch, every):
    name = f"every{every}"
    t, _ = _budget_run(tmp_path, monkeypatch, "40s", name, "--eval-every", str(every), eval_seconds=3.0)
    t.fit()
    each = fit_steps(40.0, 0, 0, 10, Calibration(0.5, 3.0, 32), least=0)  # 3 s evaluations at every epoch end: 44 steps
    assert t.step == fit_steps(40.0, 0, 0, 10, Calibration(0.5, 3.0, 32, eval_every=every), least=0) > each + 10
    assert 0.97 <= _spent_share(t, tmp_path, name) <= 1.005
    rows = list(csv.DictReader(open(tmp_path / "runs" / name / "metrics.csv")))
    evaluated = [int(r["epoch"]) for r in rows if r["test_acc"]]
    assert evaluated == [e for e in range(1, len(rows) + 1) if e == len(rows) or (every and e % every == 0)], evaluated
    assert all(float(r["eval_seconds"]) == (3.0 if r["test_acc"] else 0.0) for r in rows)
    assert (tmp_path / "ck" / name / "best.safetensors").is_file() and t.checkpointer.best_epoch in evaluated


@pytest.mark.slow(6)
def test_a_matching_calibration_never_replans_and_equals_the_explicit_run(tmp_path, monkeypatch):
    t, _ = _budget_run(tmp_path, monkeypatch, "15s", "budget", "--deterministic", calibration=1.0, run=1.0, eval_seconds=2.0)
    assert (t.plan.epochs, t.plan.total_steps) == (2, 11)  # 15 s at 1 s/step + 2 s/evaluation: 10 + 1 steps
    t.fit()
    assert t.budget.replans == 0 and t.cfg.epochs == 200, "the config stays as resolved: the plan holds the length"
    trainer(tmp_path, *TINY_EPOCHS, "--deterministic", "--epochs", "2", "--total-steps", "11", "--run-name", "explicit").fit()
    ref, got = (load_file(tmp_path / "ck" / run / "last.safetensors") for run in ("explicit", "budget"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert read_metadata(tmp_path / "ck" / "budget" / "last.safetensors")["plan"] == {"epochs": 2, "total_steps": 11}


@pytest.mark.slow(7)
def test_a_resumed_budget_run_spends_only_the_rest(tmp_path, monkeypatch):
    lines = []
    t, clock = _budget_run(tmp_path, monkeypatch, "40s", "cut", lines=lines)
    interrupt_at(t, 23)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    state = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    spent = state["spent_seconds"]
    assert state["step"] == 23 and spent == pytest.approx(23 * 0.5 + 2 * 1.0)
    clock.now += 1000.0  # the time between the stop and the resume is not the run's
    cfg, explicit = parse_args(run_args(tmp_path, "--resume", "cut"))
    resumed = Trainer.from_config(cfg, explicit, out=lines.append)
    resumed.fit()
    assert any(f"{spent:.1f}s of 40s spent before the stop" in x for x in lines), lines
    assert 0.97 <= _spent_share(resumed, tmp_path, "cut") <= 1.005
    assert resumed.step == fit_steps(40.0, 0, 0, 10, Calibration(0.5, 1.0, 32), least=0)


def test_budget_and_epochs_flags_together_are_one_line_errors(tmp_path, capsys):
    for flags in (["--time-budget", "60s", "--epochs", "3"], ["--time-budget", "10m", "--total-steps", "9"],
                  ["--time-budget", "soon"]):
        with pytest.raises(SystemExit) as exc:
            main_train(run_args(tmp_path, *flags))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and "--time-budget" in err, err


def test_an_explicit_run_has_no_budget_loop(tmp_path):
    t = trainer(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "3")
    assert t.budget is None and (t.plan.total_steps, t.plan.knots) == (6, [])
    assert math.isclose(t.plan.schedule_step(5), 5)
