"""--compile auto: compiled only where the measured gain repays the compilation within the budget, cached, and
charged to the budget; on a clock the test controls (steps, evaluations and the compilation take virtual seconds)."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from test_demo import AVX2
from test_training import run_args
from virtual_clock import install

from preactresnet import precision
from preactresnet.compiling import Timing, cache_key, choose, worth_compiling
from preactresnet.config import TrainConfig, parse_args
from preactresnet.distributed import DistInfo
from preactresnet.training import Trainer
from preactresnet.training.parts import Network
from preactresnet.training.resolve import resolve_config

@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts without cached figures (the session's precision cache is shared by the tests of a worker)."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache" / "precision.json"))


EAGER, COMPILED, COMPILING = Timing(0.10, 1.0, 0.3, 3), Timing(0.08, 1.0, 40.24, 3), 40.0  # 1.25x after 40 s


def _choose(budget, compile="auto", dist=DistInfo(), **cfg):
    calls = []

    def timed(compiled):
        calls.append(compiled)
        return COMPILED if compiled else EAGER

    return choose(TrainConfig(compile=compile, time_budget=f"{budget}s", **cfg), dist, torch.device("cpu"), budget, timed), calls


def test_the_compilation_must_be_repaid_within_the_budget():
    assert COMPILED.compile_seconds == pytest.approx(COMPILING) and EAGER.compile_seconds == 0.0
    assert not worth_compiling(70, 0.10, 0.08, COMPILING)  # 30 s of steps left at 1.25x: fewer than 70 s eager
    assert not worth_compiling(200, 0.10, 0.08, COMPILING)  # 2,000 eager steps against 2,000 compiled: no 3% gain
    assert worth_compiling(900, 0.10, 0.08, COMPILING)  # 9,000 against 10,750
    assert not worth_compiling(900, 0.10, 0.099, COMPILING)  # a 1% faster step never repays 40 s


def test_a_short_budget_without_figures_stays_eager_and_times_nothing_compiled():
    choice, calls = _choose(70)
    assert (choice.compiled, choice.charged, calls) == (False, 0.0, [False])
    assert "under 10 min" in choice.line


def test_a_long_budget_measures_both_caches_them_and_the_next_run_reads_them():
    choice, calls = _choose(900)
    assert (choice.compiled, calls, choice.timing) == (True, [False, True], COMPILED)
    assert choice.charged == pytest.approx(COMPILING) and "timed here" in choice.line and "compiled" in choice.line
    again, calls = _choose(1800)  # cached: only the chosen step is calibrated
    assert (again.compiled, calls) == (True, [True]) and "cached in" in again.line
    short, calls = _choose(120)  # the same figures: 120 s cannot repay 40 s
    assert (short.compiled, short.charged, calls) == (False, 0.0, [False]) and "not worth" in short.line


def test_both_timings_key_their_cache_by_the_same_machine_and_kernels(monkeypatch):
    cfg, cpu = TrainConfig(), torch.device("cpu")
    shared = precision.machine_key(precision.cpu_name())
    assert cache_key(cfg, cpu).startswith(f"compile | {shared} | ")
    assert precision.cache_key(cfg, 10, True).startswith(f"{shared} | ")
    other = "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2"  # under AVX2 emulation too
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", other)  # another kernel set: neither timing may be reused
    assert not cache_key(cfg, cpu).startswith(f"compile | {shared} | ")
    assert not precision.cache_key(cfg, 10, True).startswith(f"{shared} | ")


def test_on_off_and_the_cases_auto_leaves_alone():
    on, calls = _choose(70, compile="on")
    assert (on.compiled, on.charged, on.line, calls) == (True, pytest.approx(COMPILING), None, [True])
    off, calls = _choose(3600, compile="off")
    assert (off.compiled, off.charged, off.line, calls) == (False, 0.0, None, [False])
    ddp, _ = _choose(3600, dist=DistInfo(rank=0, world_size=2))
    assert not ddp.compiled and "one process" in ddp.line
    fixed, _ = _choose(3600, deterministic=True)
    assert not fixed.compiled and "--deterministic" in fixed.line


def test_the_flag_takes_a_value_and_old_configs_their_booleans():
    assert [parse_args(a)[0].compile for a in ([], ["--compile"], ["--no-compile"], ["--compile", "off"])] == ["auto", "on", "off", "off"]
    from preactresnet.config import from_dict

    assert (from_dict({"compile": True}).compile, from_dict({"compile": False}).compile) == ("on", "off")
    with pytest.raises(ValueError, match="--compile must be auto, on or off"):
        TrainConfig(compile="sometimes").validated()


@pytest.mark.slow(6)
def test_a_budget_run_compiles_when_it_pays_and_pays_the_compilation_from_its_budget(tmp_path, monkeypatch):
    """Virtual time: an eager step 5 s, a compiled one 2.5 s, the first compiled step 40 s more (compiling);
    torch.compile itself replaced by a marker (the real one has its own tests), so the test times nothing real."""
    compiled_once = []

    def fake_compile(net, out):
        return dataclasses.replace(net, compiled=True)

    def step_seconds(t):
        if not t.net.compiled:
            return 5.0
        first = not compiled_once
        compiled_once.append(1)
        return 2.5 + (COMPILING if first else 0.0)

    monkeypatch.setattr(Network, "compile", fake_compile)
    install(monkeypatch, step_seconds, eval_seconds=1.0)
    lines = []
    cfg, explicit = parse_args(run_args(tmp_path, "--max-steps-per-epoch", "100", "--time-budget", "10m", "--run-name", "auto"))
    t = Trainer.from_config(cfg, explicit, out=lines.append)
    assert t.net.compiled and t.step_parts.train_module is t.net.train_module
    assert any(line.startswith("--compile auto: compiled") for line in lines), lines
    assert t.budget.seconds == pytest.approx(600 - COMPILING, abs=1.0), "the compilation is paid from the budget"
    t.fit()
    rows = list(csv.DictReader(open(tmp_path / "runs" / "auto" / "metrics.csv")))
    spent = float(rows[-1]["elapsed_seconds"])
    assert 0.95 * (600 - COMPILING) <= spent <= 600 - COMPILING + 5, spent
    assert t.step > 0.9 * (600 - COMPILING - 3) / 2.5, "planned at the compiled speed"
    cfg, explicit = parse_args(run_args(tmp_path, "--resume", str(tmp_path / "ck" / "auto")))
    assert resolve_config(cfg, explicit, DistInfo()).cfg.compile == "on", "a resume compiles the step its plan was made for"


_ONE_KERNEL_SET = """
import torch
from preactresnet.system import compile_module
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(800, 10))
x = torch.randn(5, 3, 10, 10)
print((compile_module(net)(x) - net(x)).abs().max().item())
"""


@pytest.mark.slow(25)
def test_a_cache_shared_by_two_vector_widths_gives_each_its_own_kernels(tmp_path):
    """Three processes share one inductor cache, the second with AVX2's kernels (ATEN_CPU_CAPABILITY), as hosts of two
    kinds sharing a cache dir would: each computes what eager computes. Without system.pin_vector_width, on an AVX512
    host the second rebuilt the first's cached AVX512 kernels for AVX2 (off by 1.1; NaN in training) and the third,
    the other way round, corrupted its heap (free(): invalid next size)."""
    from torch._inductor import cpu_vec_isa

    best = cpu_vec_isa.valid_vec_isa_list()[:1]  # the host's widest vector ISA, whatever this process was told
    if not best or best[0].bit_width() != 512 or not hasattr(cpu_vec_isa, "get_isa_from_cpu_capability"):
        pytest.skip("two vector widths on one host need AVX512 and a torch whose inductor reads ATEN_CPU_CAPABILITY")
    own = {k: v for k, v in os.environ.items() if k not in AVX2}
    own["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    for kernels in ("own", "AVX2", "own"):
        run = subprocess.run([sys.executable, "-c", _ONE_KERNEL_SET], capture_output=True, text=True, timeout=300,
                             env={**own, **AVX2} if kernels == "AVX2" else own)
        assert run.returncode == 0, (kernels, run.stderr[-800:])
        assert float(run.stdout.split()[-1]) < 1e-4, (kernels, run.stdout)
