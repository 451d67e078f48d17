"""The optimizer kernels a run asks torch for, where torch's answer depends on its version and the device.

CUDA parameters are made without a GPU by torch's FakeTensorMode: they carry device cuda:0 through torch's
own Python-level checks (the ones that refuse a kernel), and no kernel runs on a device.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from preactresnet import optim
from preactresnet.config import TrainConfig


@pytest.fixture
def torch_2_5_adagrad(monkeypatch):
    """Adagrad's fused check as torch 2.5.1 calls it (`cuda_unsupported=True`: fused on the CPU only)."""
    import torch.optim.adagrad as adagrad

    check = getattr(adagrad, "_device_dtype_check_for_fused", None)
    if check is None:
        pytest.skip("this torch's Adagrad has no fused device check")
    monkeypatch.setattr(adagrad, "_device_dtype_check_for_fused", functools.partial(check, cuda_unsupported=True))
    optim.fused_refusal.cache_clear()
    yield
    optim.fused_refusal.cache_clear()


def test_default_optimizer_steps_on_a_torch_that_refuses_fused_adagrad_on_cuda(torch_2_5_adagrad):
    """Item 1: the spec's default (Adagrad) asked for fused=True on CUDA, which torch 2.5.1 refuses at the
    first step. The probe now finds the refusal and the optimizer takes the foreach kernels."""
    cfg = TrainConfig(optimizer="adagrad", lr=0.05)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = torch.nn.Linear(8, 4, device="meta")
        for name in ("weight", "bias"):  # zeros: a random start would ask for a CUDA generator
            setattr(model, name, torch.nn.Parameter(torch.zeros_like(getattr(model, name), device="cuda")))
        assert next(model.parameters()).device.type == "cuda"
        opt = optim.build_optimizer(cfg, model)
        for param in model.parameters():  # autograd would look for a CUDA context: gradients set by hand
            param.grad = torch.ones_like(param)
        opt.step()
    assert not any(g.get("fused") for g in opt.param_groups)
    assert "supported devices" in optim.fused_refusal("adagrad", torch.device("cuda", 0))


def test_fused_kernels_are_asked_for_only_where_torch_takes_them():
    optim.fused_refusal.cache_clear()
    assert optim.fused_refusal("adagrad", torch.device("cpu")) is None or torch.__version__ < "2.6"
    assert optim.fused_refusal("muon", torch.device("cpu")) == "torch has no fused muon"
    assert not optim.wants_fused("sgd", torch.device("cpu")), "on a CPU the foreach kernels"


def test_resume_places_step_counters_for_this_runs_fused_kernels(tmp_path, monkeypatch):
    """Item 5: a run saved unfused (on a CPU) and resumed fused (on a GPU) had its `step` counters placed by
    torch for the saved groups' kernels (host tensors) and then handed to a fused CUDA kernel. Fused kernels
    run on a CPU too, so the run is resumed fused here and torch's placement is watched."""
    from test_preemption import _saved_state, trainer

    run_dir = _saved_state(tmp_path, at="end", extra=("--optimizer", "adamw", "--lr", "0.01"))
    monkeypatch.setattr(optim, "wants_fused", lambda name, device: True)  # what a GPU asks for
    seen, place = [], torch.optim.Optimizer._process_value_according_to_param_policy

    def watched(param, value, param_id, param_groups, key=None):
        if key == "step":
            group = next(g for g in param_groups if param_id in g["params"])
            seen.append(bool(group.get("fused") or group.get("capturable")))
        return place(param, value, param_id, param_groups, key)

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy", staticmethod(watched))
    resumed = trainer(tmp_path, "--resume", str(run_dir))
    assert all(g.get("fused") for g in resumed.step_parts.optimizer.param_groups)
    assert seen and all(seen), "each step counter placed for the fused kernel that will read it"
    resumed.train_steps(1)  # and the fused kernel takes them


class HostWaits(TorchDispatchMode):
    """The ops that make the host wait for a GPU: a read of a device value (item, bool), or a device value
    mixed into a step counter that torch or timm keeps on the host (non-capturable groups: a CPU tensor on a
    GPU too). On the CPU nothing waits, so the host counters are named by the test and watched."""

    def __init__(self, host_counters):
        super().__init__()
        self.host, self.ops = {id(t) for t in host_counters}, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        hosted = [id(t) in self.host for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        name = func.__name__.split(".")[0]
        if name == "_local_scalar_dense" and not all(hosted):
            self.ops["read of a device value"] += 1
        elif any(hosted) and not all(hosted):
            self.ops[f"{name}: a host step counter and a device value"] += 1
        return func(*args, **(kwargs or {}))


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd", "adamw", "muon"])
def test_an_fp16_step_never_waits_for_the_device_even_when_skipped(optimizer, monkeypatch):
    """Item 3: GradScaler (fp16) hands found_inf to the optimizer; Muon undid a skipped step with torch.where
    into the fallback AdamW's host step counters, a copy to the host per counter. Run as on a GPU (fused
    kernels; a CPU GradScaler in place of CUDA's), with one overflowing step, which must change nothing."""
    monkeypatch.setattr(optim, "wants_fused", lambda name, device: True)
    torch.manual_seed(0)
    model, x, y = Tiny(), torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    opt = optim.build_optimizer(TrainConfig(optimizer=optimizer, lr=0.01, momentum=0.9), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def step(overflow=False):
        opt.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if overflow:
            model.head.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()

    step()  # state made
    host = [s for g in opt.param_groups if not (g.get("capturable") or g.get("fused")) for p in g["params"]
            if torch.is_tensor(s := opt.state[p].get("step"))]
    weights = [p.detach().clone() for p in model.parameters()]
    with HostWaits(host) as waits:
        step(overflow=True)
        unchanged = all(torch.equal(a, p) for a, p in zip(weights, model.parameters()))
        step()
    if not getattr(opt, "_step_supports_amp_scaling", False):  # torch 2.5's fused Adagrad: GradScaler reads
        waits.ops["read of a device value"] -= 2  # found_inf to skip the step, once a step (what it prints)
    assert not +waits.ops, f"host waits in two fp16 steps of {optimizer}: {dict(waits.ops)}"
    assert unchanged, "the overflowing step was skipped"


def test_sync_bn_says_what_it_costs(capsys):
    """Item 4: torch's SyncBatchNorm indexes the gathered statistics with a boolean mask three times per layer
    (a host read each); the README said a training step never synchronizes and recommended --sync-bn."""
    from pathlib import Path

    from preactresnet.cli import main_train
    from preactresnet.models import create_model

    layers = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in create_model("preactresnet18").modules())
    with pytest.raises(SystemExit):
        main_train(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{3 * layers} host waits a step for PreActResNet18" in help_text
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert f"{3 * layers} a step for PreActResNet18" in readme.replace("*", "") and "preactresnet18.yaml --sync-bn" not in readme
