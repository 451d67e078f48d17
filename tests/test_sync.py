"""The training step never makes the host wait for the device: no synchronizing call per step.

Counted two ways, over the whole package and the libraries it calls: aten ops that read the device
(`_local_scalar_dense`: item and bool; `nonzero`; `bincount`) or build a tensor from Python values
(`lift_fresh`: torch.tensor), through a TorchDispatchMode; and the Python calls the dispatcher does
not see on a CPU (`.tolist`, `.cpu`, `.numpy`), made from preactresnet/ (bench/sync_count.py).
A step's count is the difference between runs of 2 and 8 steps: what one call of train_steps
does once (the loss read at its end) cancels out, what each step does would not.
"""

import dataclasses
import itertools
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_training import run_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from sync_count import ISSUE_COMMAND, SyncCounter, count_training  # noqa: E402

SYNC_OPS = ("_local_scalar_dense", "nonzero", "bincount", "lift_fresh")


class AtenSyncs(TorchDispatchMode):
    """Counts the aten ops that synchronize with (or copy Python values to) the device. Reading an
    optimizer's step counter is not counted: torch keeps it on the host (a CPU tensor on GPUs too)."""

    def __init__(self, host_counters=()):
        super().__init__()
        self.ops = Counter()
        self.host = {id(t) for t in host_counters}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense" and id(args[0]) in self.host:
            pass
        elif name in SYNC_OPS:
            self.ops[name] += 1
        if name == "_to_copy" and isinstance(args[0], torch.Tensor) and kwargs and "device" in kwargs:
            if torch.device(kwargs["device"]) != args[0].device:
                self.ops["copy to another device"] += 1
        return func(*args, **(kwargs or {}))


def _counts(trainer, steps: int) -> Counter:
    trainer.loaders.train.set_epoch(0)
    python = SyncCounter("preactresnet/")
    steps_kept = [s["step"] for s in trainer.step_parts.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    with python.patched(), AtenSyncs([t for t in steps_kept if t.device.type == "cpu"]) as aten:
        python.active = True
        trainer.train_steps(steps)
    return aten.ops + Counter({k.split(" at ")[0]: v for k, v in python.calls.items()})


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd", "adamw", "muon"])
def test_no_synchronization_per_training_step(tmp_path, optimizer):
    from preactresnet.config import parse_args
    from preactresnet.training import Trainer

    argv = run_args(tmp_path, "--jitter-prob", "0.8", "--erase-prob", "0.25", "--mix-prob", "0.5", "--ema", "--ema-warmup",
                    "--lookahead", "--optimizer", optimizer, "--lr", "0.01", "--alt-flip", "--log-interval", "1000", "--epochs", "1")
    cfg, explicit = parse_args(argv)
    t = Trainer.from_config(cfg, explicit, out=lambda *a: None)
    _counts(t, 1)  # first use: constants built once per device, kernels chosen
    few, many = _counts(t, 2), _counts(t, 8)
    per_step = {k: (many[k] - few[k]) / 6 for k in many | few if many[k] != few[k]}
    assert not per_step, f"synchronizing calls per training step: {per_step}"
    assert sum(few.values()) <= 4, f"one call of train_steps reads the device a few times at its end, not {few}"


@pytest.mark.slow(7)
def test_the_issue_command_makes_no_data_path_synchronization(tmp_path):
    """Issue 15's count: demo recipe with jitter, erasing and mixing, 30 steps, calls from preactresnet/data/."""
    out = ["--no-progress", "--profile", "off", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
           "--fig-dir", str(tmp_path / "fig")]
    counter, steps = count_training([*ISSUE_COMMAND, *out, "--max-steps-per-epoch", "10"])
    assert steps == 10 and counter.total / steps <= 0.1, dict(counter.calls)


def test_evaluation_reads_the_device_once_per_pass(sample_dataset, monkeypatch):
    from preactresnet.data import BatchAugment, TensorLoader
    from preactresnet.evaluation import evaluate
    from preactresnet.models import create_model

    ds = sample_dataset
    loader = TensorLoader(ds.test_images[:600], ds.test_labels[:600], 100, train=False,
                          transform=BatchAugment(None, ds.mean, ds.std))
    model = create_model("preactresnet18", width_mult=0.125)
    aten, reads, cpu = AtenSyncs(), [], torch.Tensor.cpu

    def read_back(tensor, *args, **kwargs):  # the pass's one read; what follows runs on host copies
        reads.append(dict(aten.ops))
        aten.ops.clear()
        return cpu(tensor, *args, **kwargs)

    evaluate(model, loader, 10)  # builds the normalisation constants once per process (cached): not a per-pass read
    monkeypatch.setattr(torch.Tensor, "cpu", read_back)
    with aten:
        result = evaluate(model, loader, 10)
    assert reads == [{}], f"one read at the end of 6 batches, none before it: {reads}"
    assert result.total == 600 and int(result.confusion.sum()) == 600


def test_seeded_jitter_choice_is_the_independent_per_sample_coin():
    """The host-seeded path picks a binomial count, then a uniform subset: the same distribution as an
    independent coin per sample (rate p, count variance B p (1 - p), every position equally likely)."""
    from preactresnet.data import AugmentConfig, BatchAugment

    aug = BatchAugment(AugmentConfig(jitter_prob=0.8), (0.5,) * 3, (0.25,) * 3)
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([aug.sample_params(64, 32, 32, "cpu", g, seed=f"0:0:0:{b}")["jitter"] for b in range(2000)])
    counts = masks.sum(dim=1).double()
    assert abs(masks.double().mean() - 0.8) < 0.005
    assert abs(counts.var() / (64 * 0.8 * 0.2) - 1) < 0.15
    assert (masks.double().mean(dim=0) - 0.8).abs().max() < 0.04  # no position favoured
    again = aug.sample_params(64, 32, 32, "cpu", torch.Generator().manual_seed(0), seed="0:0:0:0")
    first = aug.sample_params(64, 32, 32, "cpu", torch.Generator().manual_seed(0), seed="0:0:0:0")
    assert torch.equal(again["jitter"], first["jitter"]) and again["jitter_order"] == first["jitter_order"]


# -- the other GPU-path defects, where a CPU can show them ---------------------------------------------
def test_the_epoch_order_is_made_before_the_steps(monkeypatch):
    from preactresnet.data import TensorLoader

    loader = TensorLoader(torch.zeros(64, 3, 4, 4, dtype=torch.uint8), torch.arange(64), 8, train=True,
                          transform=lambda im, g: im)
    loader.set_epoch(1)
    made = []
    monkeypatch.setattr(loader, "_indices", lambda: made.append(1))
    assert len(list(loader)) == 8 and not made, "no shuffle inside the (timed) steps"


def test_one_ranks_non_finite_loss_stops_every_rank_at_the_log_step(tmp_path):
    from preactresnet.config import parse_args
    from preactresnet.training import NonFiniteLoss, Trainer

    cfg, explicit = parse_args(run_args(tmp_path, "--log-interval", "2", "--epochs", "1"))
    t = Trainer.from_config(cfg, explicit, out=lambda *a: None)
    # what an all-reduce returns when another rank diverged
    t.net = dataclasses.replace(t.net, all_reduce=lambda values: values.fill_(float("nan")))
    with pytest.raises(NonFiniteLoss, match="step 2"):
        t.train_steps(3)


def test_optimize_baseline_is_what_amp_off_runs_and_steps_are_enough_on_a_gpu(monkeypatch):
    from preactresnet import optimize

    cuda = torch.device("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.allow_tf32 = False
        with optimize._settings(cuda, {"amp": "fp32", "cudnn_benchmark": True}):
            assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # PyTorch's defaults
        with optimize._settings(cuda, {"amp": "tf32", "cudnn_benchmark": True}):
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
    assert optimize.timing_steps(cuda, quick=True)[1] >= 20 and optimize.timing_steps(cuda, quick=False)[1] >= 50
    assert "TF32 convs" in optimize.describe({"amp": "fp32", "channels_last": "on", "compile": False, "cudnn_benchmark": True})
    calls = []
    real = optimize.BatchAugment.__call__
    monkeypatch.setattr(optimize.BatchAugment, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    optimize.time_setting("preactresnet18", 0.125, 4, torch.device("cpu"), {"amp": "fp32", "channels_last": "on",
                          "compile": False}, warmup=1, steps=2)
    assert len(calls) == 3, "every timed step augments its batch, as training does"


def test_inference_model_takes_the_batches_memory_format(tmp_path):
    from preactresnet.checkpoint import save_weights
    from preactresnet.inference import load_model
    from preactresnet.models import create_model

    model = create_model("preactresnet18", width_mult=0.125)
    meta = {"model": "preactresnet18", "model_args": {"width_mult": 0.125}, "classes": list("abcdefghij"),
            "mean": [0.5] * 3, "std": [0.25] * 3}
    save_weights(tmp_path / "w.safetensors", model.state_dict(), meta)
    loaded = load_model(tmp_path / "w.safetensors")
    convs = [m.weight for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_sync_debug_on_the_cpu_says_what_to_use_instead(tmp_path):
    from preactresnet.config import parse_args
    from preactresnet.training import Trainer

    said = []
    cfg, explicit = parse_args(run_args(tmp_path, "--sync-debug", "--epochs", "1", "--max-steps-per-epoch", "1"))
    Trainer.from_config(cfg, explicit, out=said.append).fit()
    assert any("bench/sync_count.py" in s for s in said)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only (set_device for cuda:N, fused optimizers, "
                    "sync debug mode); bench/gpu.sh runs this on a GPU")
def test_cuda_device_index_fused_optimizers_and_a_clean_step(tmp_path):
    from preactresnet.config import parse_args
    from preactresnet.training import Trainer

    n = torch.cuda.device_count() - 1
    cfg, explicit = parse_args(run_args(tmp_path, "--device", f"cuda:{n}", "--amp", "auto", "--epochs", "1"))
    t = Trainer.from_config(cfg, explicit, out=lambda *a: None)
    assert torch.cuda.current_device() == n and t.step_parts.optimizer.defaults.get("fused") is True
    t.loaders.train.set_epoch(0)
    t.train_steps(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in itertools.islice(t.loaders.train, 3):
            t._step(x, y)  # a step with any host synchronization raises here
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _muon_and_scaler(seed=0):
    from preactresnet.optim import MuonNS

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    opt = MuonNS([{"params": [model[0].weight]}, {"params": [model[0].bias, model[2].weight, model[2].bias], "use_fallback": True}],
                 ns_dtype=torch.float32, lr=0.02, weight_decay=5e-4, momentum=0.9, nesterov=True)
    return model, opt, torch.amp.GradScaler("cpu", init_scale=1024.0)


def _scaled_step(model, opt, scaler, x, poison=False):
    loss = model(x).square().mean()
    scaler.scale(loss).backward()
    if poison:
        model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def test_fp16_scaler_with_muon_reads_nothing_on_the_host(monkeypatch):
    """GradScaler with Muon (no fused kernel): found_inf stays on the device, the step is undone there when
    it is set, and a finite step equals the unscaled step of the same optimizer."""
    x = torch.randn(5, 3, 8, 8)
    model, opt, scaler = _muon_and_scaler()
    ref_model, ref_opt, _ = _muon_and_scaler()
    _scaled_step(model, opt, scaler, x)  # the first step creates the state
    ref_model(x).square().mean().backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    saved = [p.clone() for p in model.parameters()]
    momentum = opt.state[model[0].weight]["momentum_buffer"].clone()
    # GradScaler's own path for other optimizers reads found_inf on the host (`.item()`) to decide to step
    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step", lambda *a, **k: pytest.fail("found_inf read on the host"))
    _scaled_step(model, opt, scaler, x, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved)), "a step with an inf gradient moved the weights"
    assert torch.equal(opt.state[model[0].weight]["momentum_buffer"], momentum)
    assert scaler.get_scale() == 512.0, "the skipped step halves the scale, as GradScaler always does"
