"""--conv-wgrad: a conv's weight gradient by one matmul gives oneDNN's numbers, and `auto` picks it per shape as timed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from preactresnet import convgrad
from preactresnet.distributed import DistInfo
from preactresnet.models import create_model


def aten_weight_grad(grad, x, weight, stride, padding):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("cin,cout,size,kernel,stride,padding", [
    (3, 8, 9, 3, 1, 1), (8, 16, 8, 3, 2, 1), (16, 16, 4, 3, 1, 1), (8, 16, 7, 1, 2, 0), (4, 6, 6, 5, 1, 2), (5, 7, 7, 3, 2, 0),
])
def test_matmul_weight_grad_is_onednns(channels_last, cin, cout, size, kernel, stride, padding):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, cin, size, size, dtype=torch.float64).to(memory_format=layout)
    weight = torch.randn(cout, cin, kernel, kernel, dtype=torch.float64)
    grad = torch.randn_like(F.conv2d(x, weight, None, stride, padding))
    got = convgrad.weight_grad_mm(grad, x, kernel, stride, padding)
    torch.testing.assert_close(got, aten_weight_grad(grad, x, weight, stride, padding))


def grads(model, x, y, amp):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        F.cross_entropy(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("amp", [False, True])
def test_switched_network_trains_as_before(amp):
    """Every eligible conv of PreActResNet18 switched: same state_dict, same outputs, the same gradients (bf16: to rounding)."""
    torch.manual_seed(0)
    model = create_model("preactresnet18", width_mult=0.25).to(memory_format=torch.channels_last)
    switched = copy.deepcopy(model)
    names = set(convgrad.conv_inputs(switched, (3, 32, 32), 8))
    assert len(names) == 17  # the stem and 16 block convs (the 1x1 shortcuts are StridedPointwise: a matmul already)
    convgrad.use_matmul(switched, names)
    assert sum(isinstance(m, convgrad.MatmulGradConv2d) for m in switched.modules()) == 17
    assert switched.state_dict().keys() == model.state_dict().keys()
    x, y = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last), torch.randint(0, 10, (8,))
    want, got = grads(model, x, y, amp), grads(switched, x, y, amp)
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert err < (2e-2 if amp else 1e-5), name


def test_finding_shapes_leaves_batchnorm_statistics_alone():
    model = create_model("preactresnet18", width_mult=0.25).train()
    before = copy.deepcopy(model.state_dict())
    shapes = convgrad.conv_inputs(model, (3, 32, 32), 64)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert shapes["stem"] == (64, 3, 32, 32, 16, 3, 1, 1)  # (batch, Cin, H, W, Cout, kernel, stride, padding)
    assert shapes["stages.3.1.conv2"] == (64, 128, 4, 4, 128, 3, 1, 1)


def fake_timer(fast_from_channels):
    calls = []

    def timer(shape, dtype, channels_last):
        calls.append(shape)
        matmul_wins = shape[1] >= fast_from_channels  # Cin
        return {"aten": 3.0 if matmul_wins else 1.0, "matmul": 1.0 if matmul_wins else 3.0}
    return timer, calls


def test_auto_picks_the_faster_per_shape_and_caches_it():
    model = create_model("preactresnet18", width_mult=0.25)
    timer, calls = fake_timer(fast_from_channels=64)  # the matmul wins where 64 or more channels come in
    names, line = convgrad.choose_matmul(model, (3, 32, 32), 16, torch.bfloat16, True, timer=timer)
    shapes = convgrad.conv_inputs(model, (3, 32, 32), 16)
    assert names == {n for n, s in shapes.items() if s[1] >= 64} and names
    assert len(calls) == len(set(shapes.values()))
    assert f"matmul for {len(names)} of 17 convs" in line and "timed" in line
    again, calls_again = fake_timer(fast_from_channels=0)
    names2, line2 = convgrad.choose_matmul(model, (3, 32, 32), 16, torch.bfloat16, True, timer=again)
    assert names2 == names and not calls_again and "cached" in line2  # the cache answers, nothing timed


def test_timing_a_shape_leaves_the_seeded_random_stream_alone():
    """The first run on a machine times, later ones read the cache: the same seed must draw the same numbers in both."""
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    convgrad.time_shape((4, 8, 8, 8, 16, 3, 1, 1), torch.float32, True)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_matmul_setting_switches_every_eligible_conv_and_aten_none():
    model = create_model("preactresnet18", width_mult=0.25)
    line = convgrad.configure(model, "matmul", (3, 32, 32), 4, None, True, DistInfo())
    assert "17 convs" in line
    assert sum(type(m) is convgrad.MatmulGradConv2d for m in model.modules()) == 17


def test_ineligible_convs_are_left_alone():
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    assert not convgrad.eligible(grouped) and not convgrad.eligible(nn.Conv2d(3, 8, 3, bias=True))
    assert not convgrad.eligible(nn.Conv2d(3, 8, 3, padding="same", bias=False))
    assert convgrad.eligible(nn.Conv2d(3, 8, 3, padding=1, bias=False))


def test_whether_compiled_ddp_refuses_the_matmul_is_read_from_torchs_own_code(monkeypatch):
    """2.5.1's DDPOptimizer raises on any higher-order op, 2.14.1's splits around it: read from compile_fn's code
    (through a wrapper), no where DDPOptimizer is off, and yes (oneDNN's gradient, slower but safe) where unreadable."""
    import functools

    import torch._dynamo
    from torch._dynamo.backends.distributed import DDPOptimizer

    def refusing(self, gm, example_inputs):
        if has_higher_order_op(gm):  # noqa: F821 - never called: only its code's names are read
            raise NotImplementedError

    def taking(self, gm, example_inputs):
        return gm

    for fn, refused in ((refusing, True), (taking, False)):
        monkeypatch.setattr(DDPOptimizer, "compile_fn", functools.wraps(fn)(lambda *a: fn(*a)))
        assert convgrad.ddp_compile_refuses_matmul() is refused
    with torch._dynamo.config.patch(optimize_ddp=False):  # torch's own patch: a plain setattr's undo breaks its config
        assert convgrad.ddp_compile_refuses_matmul() is False
    monkeypatch.setattr(DDPOptimizer, "compile_fn", property(lambda self: None))  # no code to read
    assert convgrad.ddp_compile_refuses_matmul() is True
