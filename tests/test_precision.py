"""--amp auto and --muon-ns-dtype auto on a CPU: chosen by timing (driven here by a fake clock), cached,
printed; explicit settings win; Muon's orthogonalization really runs in the dtype chosen."""

from __future__ import annotations

import json

import pytest
import timm.optim.muon as timm_muon
import torch
import torch.nn.functional as F
from test_training import run_args
from timm.optim import create_optimizer_v2

import preactresnet.precision as precision
from preactresnet.config import TrainConfig, parse_args
from preactresnet.training.resolve import resolve_config
from preactresnet.distributed import DistInfo
from preactresnet.models import create_model
from preactresnet.optim import build_optimizer, param_groups
from preactresnet.training import Trainer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_candidates(monkeypatch, clock: FakeClock, amp: dict, ns: dict, calls: list) -> None:
    """Candidates that only advance the fake clock: `amp` and `ns` give each one's seconds per call (for the
    run's batch of 64; a probe batch takes its share of that time, and its calls are recorded as 'probe')."""
    def make(kind, name, seconds):
        def call():
            calls.append((kind, name))
            clock.now += seconds
        return call

    def amp_candidates(cfg, k, cl, batch=None):
        size = min(batch or cfg.batch_size, 128)
        return {n: make("amp" if batch is None else "probe", n, s * size / 64) for n, s in amp.items()}, size

    monkeypatch.setattr(precision, "amp_candidates", amp_candidates)
    monkeypatch.setattr(precision, "ns_candidates", lambda cfg, k: {n: make("ns", n, s) for n, s in ns.items()})


def resolved(tmp_path, *flags, clock=None):
    cfg, explicit = parse_args(["--data-dir", "sample", "--width-mult", "0.125", "--batch-size", "64", *flags])
    run = resolve_config(cfg, explicit, DistInfo())
    return precision.resolve_precision(run, DistInfo(), 10, True, clock=clock, path=tmp_path / "precision.json")


@pytest.mark.parametrize("bf16_seconds, amp", [(0.05, "bf16"), (0.2, "off"), (0.098, "off")])
def test_amp_auto_takes_the_faster_precision(tmp_path, monkeypatch, bf16_seconds, amp):
    clock, calls = FakeClock(), []
    fake_candidates(monkeypatch, clock, {"off": 0.1, "bf16": bf16_seconds}, {"fp32": 0.01, "bf16": 0.05, "bf16-gram": 0.03}, calls)
    run = resolved(tmp_path, "--optimizer", "muon", clock=clock)
    assert run.cfg.amp == amp and run.cfg.muon_ns_dtype == "fp32"  # 2% faster is noise: fp32 stays
    assert f"{64 / 0.1:.0f}" in run.precision_line and "timed here" in run.precision_line
    assert calls.count(("amp", "off")) >= 1 + precision.MIN_CALLS and calls.count(("amp", "bf16")) >= 1 + precision.MIN_CALLS


def test_a_candidate_far_slower_is_judged_on_its_warmup(monkeypatch):
    clock, calls = FakeClock(), []
    fake_candidates(monkeypatch, clock, {}, {"fp32": 0.01, "bf16": 0.1}, calls)
    seconds = precision.measure(precision.ns_candidates(None, 10), clock)
    assert seconds == {"fp32": pytest.approx(0.01), "bf16": pytest.approx(0.1)} and calls.count(("ns", "bf16")) == 1


def test_bf16_far_slower_on_a_probe_batch_never_runs_the_full_batch(tmp_path, monkeypatch):
    clock, calls = FakeClock(), []
    fake_candidates(monkeypatch, clock, {"off": 0.1, "bf16": 1.0}, {"fp32": 0.01, "bf16": 0.01}, calls)
    run = resolved(tmp_path, clock=clock)
    assert run.cfg.amp == "off" and ("amp", "bf16") not in calls, "emulated bf16 is not timed at the run's batch"
    assert calls.count(("probe", "bf16")) == 2 and f"bf16 {64 / 1.0:.0f} images/s" in run.precision_line
    assert run.cfg.muon_ns_dtype == "auto", "no Muon in this run: its dtype is not timed"


def test_explicit_settings_win_and_time_nothing(tmp_path, monkeypatch):
    clock, calls = FakeClock(), []
    fake_candidates(monkeypatch, clock, {"off": 0.1, "bf16": 0.01}, {"fp32": 0.1, "bf16": 0.01, "bf16-gram": 0.02}, calls)
    run = resolved(tmp_path, "--amp", "off", "--optimizer", "muon", "--muon-ns-dtype", "fp32", clock=clock)
    assert (run.cfg.amp, run.cfg.muon_ns_dtype, calls, run.precision_line) == ("off", "fp32", [], None)
    run = resolved(tmp_path, "--amp", "off", "--optimizer", "muon", clock=clock)  # only what is left on auto
    assert run.cfg.amp == "off" and run.cfg.muon_ns_dtype == "bf16" and {k for k, _ in calls} == {"ns"}


def test_the_faster_bf16_form_is_chosen_and_a_cache_without_it_times_muon_again(tmp_path, monkeypatch):
    clock, calls = FakeClock(), []
    fake_candidates(monkeypatch, clock, {"off": 0.1, "bf16": 0.01}, {"fp32": 0.1, "bf16": 0.05, "bf16-gram": 0.02}, calls)
    run = resolved(tmp_path, "--optimizer", "muon", clock=clock)
    assert run.cfg.muon_ns_dtype == "bf16-gram" and "fp32 100.0 vs bf16 50.0 vs bf16-gram 20.0 ms/step" in run.precision_line
    cache = json.loads((tmp_path / "precision.json").read_text())
    for entry in cache["entries"].values():
        del entry["ns"]["bf16-gram"]  # a cache written before the Gram form was a candidate
    (tmp_path / "precision.json").write_text(json.dumps(cache))
    calls.clear()
    assert resolved(tmp_path, "--optimizer", "muon", clock=clock).cfg.muon_ns_dtype == "bf16-gram"
    assert {k for k, _ in calls} == {"ns"}, "only Muon's figures are timed again"


def test_measure_excludes_the_warmup_and_times_enough_calls():
    clock, seen = FakeClock(), []

    def call(seconds):
        def run():
            seen.append(seconds)
            clock.now += seconds if len(seen) > 1 else 5.0  # a slow first call: allocation, kernel choice
        return run

    seconds = precision.measure({"a": call(0.25)}, clock)
    assert seconds == {"a": pytest.approx(0.25)} and len(seen) == 1 + 3  # 3 calls reach MIN_SECONDS (0.6 s)


def test_summary_prints_the_choice_and_a_second_run_reads_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(precision.CACHE_ENV, str(path))
    timed = []
    real_measure = precision.measure
    monkeypatch.setattr(precision, "measure", lambda c, clock=None: timed.append(list(c)) or real_measure(c))
    for run in ("first", "second"):
        lines = []
        flags = [a for a in run_args(tmp_path, "--optimizer", "muon", "--epochs", "1", "--max-steps-per-epoch", "2",
                                     "--tta", "none", "--run-name", run) if a not in ("--amp", "off")]
        cfg, explicit = parse_args(flags)
        Trainer.from_config(cfg, explicit, out=lines.append).fit()
        line = next(x for x in lines if x.startswith("precision auto:"))
        assert "images/s" in line and "ms/step" in line and str(path) in line
        assert ("timed here" if run == "first" else "cached in") in line, line
    assert [names[0] for names in timed] == ["off", "fp32"], "the second run timed nothing"  # bf16: timed or probed
    entries = json.loads(path.read_text())["entries"]
    (key, entry), = [(k, v) for k, v in entries.items() if not k.startswith("conv-wgrad |")]
    assert "preactresnet18 x0.125" in key and torch.backends.cpu.get_cpu_capability() in key
    assert set(entry["amp"]) == {"off", "bf16"} and set(entry["ns"]) == {"fp32", "bf16", "bf16-gram"}


def _one_step(optimizer, model, x, y):
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def batch():
    torch.manual_seed(0)
    return torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))


def test_muon_orthogonalizes_in_the_chosen_dtype(batch, monkeypatch):
    """Fails if timm stops looking up zeropower_via_newtonschulz where MuonNS sets the dtype."""
    import preactresnet.optim as optim
    seen = []
    original = optim.newton_schulz
    monkeypatch.setattr(optim, "newton_schulz", lambda *a, **kw: seen.append(kw.get("dtype")) or original(*a, **kw))
    after = {}
    for name in ("bf16", "fp32", "bf16-gram"):
        torch.manual_seed(1)
        model = create_model("preactresnet18", width_mult=0.125)
        cfg = TrainConfig(optimizer="muon", lr=0.02, muon_ns_dtype=name)
        before = len(seen)
        after[name] = _one_step(build_optimizer(cfg, model), model, *batch)
        assert (len(seen) - before > 10) == (name != "bf16"), "fp32 and bf16-gram go through the patch; bf16 is timm's own"
    assert seen.count(torch.float32) == seen.count(torch.bfloat16) > 10
    assert any(not torch.equal(after["bf16"][k], after["fp32"][k]) for k in after["bf16"])


@pytest.mark.parametrize("shape", [(16, 144), (128, 1152), (1152, 128), (64, 128), (32, 32)])
def test_gram_newton_schulz_is_timms_iteration(shape):
    """The Gram form gives timm's fp32 result to rounding, as close to an fp64 reference, on wide, tall and
    square matrices (the last two take timm's own path)."""
    from preactresnet.optim import newton_schulz
    torch.manual_seed(0)
    g = torch.randn(shape)
    coefficients = timm_muon.resolve_ns_coefficients("quintic", timm_muon._COEFFICIENTS)
    ours = newton_schulz(g, 5, coefficients, dtype=torch.float32)
    timms = timm_muon.zeropower_via_newtonschulz(g, 5, coefficients, dtype=torch.float32)
    exact = timm_muon.zeropower_via_newtonschulz(g.double(), 5, coefficients, dtype=torch.float64)
    assert ours.shape == g.shape and ours.dtype == torch.float32
    assert (ours - timms).abs().max() < 1e-5
    assert (ours.double() - exact).abs().max() <= 2 * (timms.double() - exact).abs().max() + 1e-7
    assert not torch.equal(ours, timm_muon.zeropower_via_newtonschulz(g, 4, coefficients, dtype=torch.float32))


def test_gram_newton_schulz_in_bf16_holds_on_a_low_rank_gradient_only_with_its_restart(monkeypatch):
    """A low-rank gradient (rank 8 plus noise, as late gradients are): the Gram form's bf16 result stays as near the fp32
    one as timm's bf16 iteration does; without the restart the rounding of X X^T is amplified into garbage."""
    import preactresnet.optim as optim
    torch.manual_seed(0)
    g = torch.randn(128, 8) @ torch.randn(8, 1152) + 0.01 * torch.randn(128, 1152)
    coefficients = timm_muon.resolve_ns_coefficients("quintic", timm_muon._COEFFICIENTS)
    ref = optim.newton_schulz(g, 5, coefficients, dtype=torch.float32)

    def error(x):
        return ((x.float() - ref).norm() / ref.norm()).item()

    timms = error(timm_muon.zeropower_via_newtonschulz(g, 5, coefficients, dtype=torch.bfloat16))
    ours = error(optim.newton_schulz(g, 5, coefficients, dtype=torch.bfloat16))
    assert ours <= 1.2 * timms, (ours, timms)
    monkeypatch.setattr(optim, "GRAM_RESTART", 5)
    assert error(optim.newton_schulz(g, 5, coefficients, dtype=torch.bfloat16)) > 5 * timms


def test_bf16_muon_is_timms_muon_bit_for_bit(batch):
    results = []
    for build in (lambda cfg, m: build_optimizer(cfg, m),
                  lambda cfg, m: create_optimizer_v2(param_groups(cfg, m), opt="muon", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                     momentum=cfg.momentum, nesterov=True)):
        torch.manual_seed(1)
        model = create_model("preactresnet18", width_mult=0.125)
        cfg = TrainConfig(optimizer="muon", lr=0.02, muon_ns_dtype="bf16")
        results.append(_one_step(build(cfg, model), model, *batch))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_fp32_step_is_timms_algorithm_with_fp32_newton_schulz():
    """One MuonNS step in fp32 equals timm's Muon update computed by hand with dtype=float32."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 72))
    g = torch.randn(16, 72)
    weight.grad = g.clone()
    before = weight.detach().clone()
    cfg = TrainConfig(optimizer="muon", lr=0.02, momentum=0.9, weight_decay=0.0, muon_ns_dtype="fp32")
    optimizer = build_optimizer(cfg, torch.nn.Sequential(torch.nn.Linear(72, 16, bias=False)))
    optimizer.param_groups[0]["params"] = [weight]
    optimizer.step()
    update = g.lerp(g * (1 - 0.9), 0.9)  # Nesterov: the gradient pulled towards the new momentum buffer
    coefficients = timm_muon.resolve_ns_coefficients("quintic", timm_muon._COEFFICIENTS)
    ortho = timm_muon.zeropower_via_newtonschulz(update, 5, coefficients, dtype=torch.float32)
    expected = before - 0.02 * timm_muon.get_lr_scale(ortho.shape, "match_rms_adamw") * ortho
    assert torch.allclose(weight.detach(), expected, atol=1e-6)
    bf16 = timm_muon.zeropower_via_newtonschulz(update, 5, coefficients)
    assert not torch.allclose(weight.detach(), before - 0.02 * timm_muon.get_lr_scale(bf16.shape, "match_rms_adamw") * bf16, atol=1e-6)
