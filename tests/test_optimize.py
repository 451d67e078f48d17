import json
import os

import pytest
import torch

from preactresnet.cli import main_optimize as main
from preactresnet.config import parse_args
from preactresnet.optimize import measure, raise_priority, system_report
from preactresnet.profile import load_profile, write_profile
from preactresnet.training import Trainer

CPU = torch.device("cpu")


def test_report_on_cpu():
    report, warnings = system_report()
    for key in ("os", "python", "torch", "cpu", "cores", "ram_gib", "cpu_features", "free_disk_gib_data"):
        assert key in report
    if not torch.cuda.is_available():
        assert any("no CUDA GPU" in w for w in warnings)


@pytest.fixture(scope="module")
def rows():
    """One quick measurement shared by the tests below, which each check a different property of it."""
    return measure("preactresnet18", 8, CPU, quick=True, width_mult=0.125, out=lambda *a: None)


def test_measure_times_every_candidate(rows):
    assert {(r["amp"], r["channels_last"]) for r in rows} >= {("fp32", "off"), ("fp32", "on"), ("bf16", "on")}
    base = [r for r in rows if r["amp"] == "fp32" and r["channels_last"] == "off" and r["threads"] == os.cpu_count()]
    assert all(r["images_per_sec"] > 0 for r in rows)
    for r in rows:  # each speed-up is the row's own measurement over the fp32 NCHW baseline's
        assert r["speedup"] == pytest.approx(r["images_per_sec"] / base[0]["images_per_sec"], abs=0.006)  # rounded to 2 places
    assert len({r["images_per_sec"] for r in rows}) > 1, "every setting is timed on its own"


def test_profile_round_trip_and_train_applies_it(rows, tmp_path):
    path = tmp_path / "profile.json"
    best = max(rows, key=lambda r: r["images_per_sec"])
    profile = write_profile(path, CPU, "preactresnet18", 8, rows)
    loaded = load_profile(str(path), "preactresnet18", CPU)
    assert loaded["settings"]["channels_last"] == best["channels_last"] == profile["settings"]["channels_last"]
    messages = []
    cfg, explicit = parse_args(["--data-dir", "sample", "--width-mult", "0.125", "--batch-size", "32", "--profile", str(path),
                                "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs")])
    t = Trainer.from_config(cfg, explicit, out=messages.append)
    assert t.cfg.amp == profile["settings"]["amp"] and t.cfg.channels_last == best["channels_last"]
    assert any("using system profile" in m for m in messages)
    # An explicit flag wins over the profile.
    cfg, explicit = parse_args(["--data-dir", "sample", "--width-mult", "0.125", "--profile", str(path), "--channels-last", "off"])
    assert Trainer.from_config(cfg, explicit, out=lambda *a: None).startup.channels_last is False


def test_profile_from_another_machine_or_model_is_ignored(rows, tmp_path):
    path = tmp_path / "profile.json"
    write_profile(path, CPU, "preactresnet18", 8, rows)
    warned = []
    assert load_profile(str(path), "resnext29_8x64d", CPU, warn=warned.append) is None
    assert "not resnext29_8x64d" in warned[-1]
    data = json.loads(path.read_text())
    data["machine"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps(data))
    assert load_profile(str(path), "preactresnet18", CPU, warn=warned.append) is None
    assert "another machine" in warned[-1]
    assert load_profile("off", "preactresnet18", CPU) is None


def test_deterministic_wins_over_profile_compile(rows, tmp_path):
    path = tmp_path / "profile.json"
    profile = write_profile(path, CPU, "preactresnet18", 8, rows)
    profile["settings"]["compile"] = True
    path.write_text(json.dumps(profile))
    cfg, explicit = parse_args(["--data-dir", "sample", "--width-mult", "0.125", "--profile", str(path), "--deterministic"])
    t = Trainer.from_config(cfg, explicit, out=lambda *a: None)
    assert t.cfg.compile == "auto" and not t.net.compiled  # and auto stays eager under --deterministic


def test_a_compile_timed_in_one_process_is_not_applied_under_torchrun(rows, tmp_path):
    """Item 6: optimize_system.py times one process; DDP's hooks and all-reduce were not in that timing."""
    from preactresnet.training.resolve import _with_profile

    path = tmp_path / "profile.json"
    profile = write_profile(path, CPU, "preactresnet18", 8, rows)
    profile["settings"]["compile"] = True
    path.write_text(json.dumps(profile))
    cfg, explicit = parse_args(["--data-dir", "sample", "--width-mult", "0.125", "--batch-size", "8", "--profile", str(path)])
    warned = []
    assert _with_profile(cfg, explicit, warned.append)[0].compile == "on"  # the world it was timed in
    assert _with_profile(cfg, explicit, warned.append, 2)[0].compile == "auto"  # auto: eager under torchrun
    assert "1 process(es), this run has 2" in warned[-1]


def test_the_report_reads_free_memory_on_this_runs_gpu_only(monkeypatch):
    """Item 6: reading free memory opens a context; a GPU in exclusive mode held by another process refuses it."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    props = SimpleNamespace(name="GPU", total_memory=80 * 2**30, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)

    def mem_get_info(i):
        if i != 0:
            raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")
        return 70 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    report, _ = system_report(device=torch.device("cuda", 0))
    assert [g["free_gib"] for g in report["gpus"]][0] == 70.0 and report["gpus"][1]["memory_gib"] == 80.0


def test_priority_failure_is_a_warning(monkeypatch):
    said = []

    def refuse(n):
        if n:
            raise PermissionError("Operation not permitted")
        return 0

    monkeypatch.setattr(os, "nice", refuse)
    assert raise_priority(out=said.append) is False
    assert said[0].startswith("warning: could not raise process priority")


def test_cli_quick_writes_profile(tmp_path, capsys):
    main(["--quick", "--batch-size", "8", "--width-mult", "0.125", "--no-priority", "--profile", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert "| setting | images/s | speed-up vs fp32 NCHW |" in out and (tmp_path / "p.json").is_file()
    # Muon's orthogonalization dtype: timed as train.py's auto times it, kept in the profile, applied by train.py
    ns = json.loads((tmp_path / "p.json").read_text())["settings"]["muon_ns_dtype"]
    assert ns in ("fp32", "bf16") and f"Muon orthogonalizing in {ns}" in out
    cfg, explicit = parse_args(["--data-dir", "sample", "--model", "preactresnet18", "--width-mult", "0.125", "--batch-size", "8",
                                "--optimizer", "muon", "--amp", "off", "--profile", str(tmp_path / "p.json")])
    messages = []
    assert Trainer.from_config(cfg, explicit, out=messages.append).cfg.muon_ns_dtype == ns
    assert not any(m.startswith("precision auto") for m in messages), "the profile's measurement is used, not timed again"


def test_timed_steps_use_the_runs_optimizer(tmp_path, capsys, monkeypatch):
    """optimize_system.py --optimizer muon times Muon steps (with the dtype it chose), not SGD's."""
    import preactresnet.optim as optim

    stepped = []
    real = optim.MuonNS.step
    monkeypatch.setattr(optim.MuonNS, "step", lambda self, *a, **k: stepped.append(self.ns_dtype) or real(self, *a, **k))
    main(["--quick", "--batch-size", "8", "--width-mult", "0.125", "--no-priority", "--optimizer", "muon",
          "--profile", str(tmp_path / "p.json")])
    ns = json.loads((tmp_path / "p.json").read_text())["settings"]["muon_ns_dtype"]
    # (the precision timing before them steps Muon in both dtypes; the candidates' steps come last: 1 + 2 each)
    assert stepped[-3:] == [optim.NS_DTYPES[ns]] * 3 and ", muon, on cpu" in capsys.readouterr().out


def test_optimize_and_the_precision_choice_time_the_loops_own_step(monkeypatch):
    """One training step function (step.train_step): the loop, optimize_system.py's timing and the precision choice."""
    import torch

    from preactresnet import optimize, precision, step
    from preactresnet.config import TrainConfig
    from preactresnet.training import loop

    assert loop.train_step is optimize.train_step is precision.train_step is step.train_step
    calls = []
    for module in (optimize, precision):
        monkeypatch.setattr(module, "train_step", lambda parts, x, y, n, _real=step.train_step: calls.append(n) or _real(parts, x, y, n))
    optimize.time_setting("preactresnet18", 0.125, 4, torch.device("cpu"), {"amp": "fp32", "channels_last": "on", "compile": False},
                          warmup=1, steps=2)
    candidates, _ = precision.amp_candidates(TrainConfig(width_mult=0.125, batch_size=4), 10, True)
    candidates["off"]()
    assert calls == [1, 2, 3, 1]
