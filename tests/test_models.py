import pytest
import timm
import torch
from test_demo import AVX2

import preactresnet
from preactresnet.models import PreActResNet, ResNeXt, count_params, create_model, list_models

ALL = list_models()
# Narrow widths keep every forward/backward on the CPU quick; the structure is unchanged.
NARROW = {"preactresnet101": 0.125, "preactresnet152": 0.125, "resnext29_16x64d": 0.125}


def test_ten_models_registered():
    assert ALL == [
        "preactresnet18", "preactresnet34", "preactresnet50", "preactresnet101", "preactresnet152",
        "resnext29_2x64d", "resnext29_4x64d", "resnext29_8x64d", "resnext29_16x64d", "resnext29_32x4d",
    ]
    assert preactresnet.list_models() == ALL


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, width_mult=NARROW.get(name, 0.25), num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


@pytest.mark.parametrize(
    "name, expected",
    [("preactresnet18", 11.17e6), ("resnext29_8x64d", 34.4e6), ("resnext29_16x64d", 68.1e6)],
)
def test_parameter_counts_match_papers(name, expected):
    n = count_params(create_model(name))
    assert abs(n - expected) / expected < 0.005, f"{name}: {n / 1e6:.2f}M parameters, paper {expected / 1e6:.2f}M"


def test_preact_has_final_bn_relu_and_preactivation_blocks():
    m = create_model("preactresnet18", width_mult=0.25)
    assert isinstance(m.final_norm, torch.nn.BatchNorm2d)
    feats = m.forward_features(torch.randn(2, 3, 32, 32))
    assert (feats >= 0).all(), "features must pass the final ReLU"
    block = m.stages[0][0]
    assert block.bn1.num_features == 16  # BN on the block input, before the first conv
    # The stem is a bare conv: pre-activation normalizes inside the first block.
    assert isinstance(m.stem, torch.nn.Conv2d)


def test_resnext_structure_follows_paper():
    m = create_model("resnext29_8x64d")
    widths = [stage[0].conv2.out_channels for stage in m.stages]
    assert widths == [8 * 64, 8 * 128, 8 * 256]  # cardinality x d, d doubling per stage
    assert [stage[0].conv3.out_channels for stage in m.stages] == [256, 512, 1024]
    assert all(stage[0].conv2.groups == 8 for stage in m.stages)
    assert [len(stage) for stage in m.stages] == [3, 3, 3]
    assert m.stages[1][0].conv2.stride == (2, 2) and m.stages[0][0].conv2.stride == (1, 1)


def test_spec_spellings_and_errors():
    assert isinstance(create_model("PreActResNet18", width_mult=0.25), PreActResNet)
    assert isinstance(create_model("ResNeXt29_8x64d", width_mult=0.125), ResNeXt)
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*preactresnet18"):
        create_model("resnet9")
    with pytest.raises(ValueError, match="does not accept"):
        create_model("preactresnet18", colour=3)


def test_timm_registration():
    m = timm.create_model("preactresnet18", num_classes=100, width_mult=0.25)
    assert isinstance(m, PreActResNet) and m.num_classes == 100
    assert "resnext29_8x64d" in timm.list_models("resnext29*")


def test_options_dropout_and_zero_init():
    m = create_model("preactresnet18", width_mult=0.25, drop_rate=0.3, zero_init_residual=True)
    assert m.head.drop.p == 0.3
    assert all((b.conv2.weight == 0).all() for stage in m.stages for b in stage)
    r = create_model("resnext29_32x4d", width_mult=0.5, zero_init_residual=True)
    assert all((b.bn3.weight == 0).all() for stage in r.stages for b in stage)
    m.reset_classifier(3)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)


STRIDED_1X1 = """
import torch
from preactresnet.models.layers import StridedPointwise
torch.manual_seed(0)
ic = {ic}
layer, ref = StridedPointwise(ic, 16, 2), torch.nn.Conv2d(ic, 16, 1, 2, bias=False)
ref.weight.data.copy_(layer.weight.data)
x = torch.randn(3, ic, 32, 32)  # an odd batch: the shape oneDNN's strided 1x1 backward crashes on (nhwc, ic < 16)
xl = x.to(memory_format=torch.channels_last).requires_grad_()
layer.to(memory_format=torch.channels_last)(xl).square().sum().backward()
x.requires_grad_()
ref(x).square().sum().backward()  # contiguous: the path that computes it right
assert torch.allclose(layer.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3), (layer.weight.grad - ref.weight.grad).abs().max()
assert torch.allclose(xl.grad, x.grad, rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.parametrize("ic,kernels", [(8, {}), (4, AVX2)],
                         ids=["avx512-segfault-shape", "avx2-hang-shape"])
def test_a_strided_1x1_conv_with_few_channels_trains_in_channels_last(ic, kernels):
    """The projection shortcut of a narrow network (PreActResNet18 x0.125: 8 -> 16 channels; x0.0625: 4 -> 8) in
    channels_last, backward at an odd batch, in its own process: on an AVX512-BF16 Zen 4 CPU plain nn.Conv2d ends in
    SIGSEGV there, and under the AVX2 kernels it hangs (oneDNN#6035). On a CPU without the fault it checks the
    same gradients as the contiguous layer."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2", **kernels}
    done = subprocess.run([sys.executable, "-c", STRIDED_1X1.format(ic=ic)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
