import pytest
import torch
import torchvision.transforms.v2.functional as TF

from preactresnet.data import AugmentConfig, BatchAugment, TensorLoader
from preactresnet.data.augment import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
N = 4096


def params(cfg=None, n=N, seed=0):
    aug = BatchAugment(cfg or AugmentConfig(), MEAN, STD)
    return aug, aug.sample_params(n, 32, 32, "cpu", torch.Generator().manual_seed(seed))


def test_crop_offsets_span_minus4_to_4_uniformly():
    _, p = params()
    for key in ("dy", "dx"):
        counts = torch.bincount(p[key] - 4 + 4, minlength=9)
        assert counts.numel() == 9 and (counts > 0).all()
        assert p[key].min() == 0 and p[key].max() == 8
        assert (counts.float() / N - 1 / 9).abs().max() < 0.02


def test_flip_erase_jitter_rates():
    cfg = AugmentConfig(flip_prob=0.5, erase_prob=0.25, jitter_prob=0.8)
    _, p = params(cfg)
    assert abs(p["flip"].float().mean() - 0.5) < 0.03
    assert abs(p["erase"].float().mean() - 0.25) < 0.03
    assert abs(p["jitter"].float().mean() - 0.8) < 0.03


def test_jitter_factors_within_ranges_and_differ_per_sample():
    cfg = AugmentConfig(brightness=0.3, contrast=0.2, saturation=0.4, hue=0.1, jitter_prob=1.0)
    _, p = params(cfg)
    for key, lo, hi in (("brightness", 0.7, 1.3), ("contrast", 0.8, 1.2), ("saturation", 0.6, 1.4), ("hue", -0.1, 0.1)):
        v = p[key]
        assert v.min() >= lo and v.max() <= hi, key
        assert v.min() < lo + 0.05 and v.max() > hi - 0.05, f"{key} does not span its range"
        assert v.unique().numel() > N // 2, f"{key} is not drawn per sample"


def test_erase_boxes_follow_torchvision_bounds():
    cfg = AugmentConfig(erase_prob=1.0)
    _, p = params(cfg)
    e = p["erase"]
    area = (p["erase_h"] * p["erase_w"]).float()[e] / 1024
    # h and w are rounded to whole pixels, as in torchvision, so the area can overshoot 0.33 a little.
    assert area.min() >= 0.015 and area.max() <= 0.37
    assert (p["erase_top"][e] + p["erase_h"][e] <= 32).all() and (p["erase_left"][e] + p["erase_w"][e] <= 32).all()


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
        (adjust_hue, TF.adjust_hue),
    ],
)
def test_colour_ops_match_torchvision_per_sample(sample_dataset, ours, theirs):
    x = sample_dataset.train_images[:64].float() / 255
    x[0] = 0.5  # a grey image: hue must leave it alone
    g = torch.Generator().manual_seed(3)
    if theirs is TF.adjust_hue:
        f = torch.rand(64, generator=g) - 0.5
    else:
        f = 0.5 + torch.rand(64, generator=g)
    got = ours(x.clone(), f)
    want = torch.stack([theirs(x[i], float(f[i])) for i in range(64)])
    assert (got - want).abs().max() < 1e-5


def test_crop_flip_erase_match_reference(sample_dataset):
    x = sample_dataset.train_images[:32]
    cfg = AugmentConfig(jitter_prob=0.0, erase_prob=0.5)
    aug, p = params(cfg, n=32, seed=5)
    out = aug.apply(x, p)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(32):
        dy, dx = int(p["dy"][i]), int(p["dx"][i])
        ref = padded[i, :, dy : dy + 32, dx : dx + 32]
        if p["flip"][i]:
            ref = ref.flip(-1)
        ref = (ref.float() / 255 - mean) / std
        if p["erase"][i]:
            t, l, h, w = (int(p[k][i]) for k in ("erase_top", "erase_left", "erase_h", "erase_w"))
            ref[:, t : t + h, l : l + w] = 0
        assert torch.allclose(out[i], ref, atol=1e-5), i


@pytest.mark.parametrize("padding", [2, 4])
def test_reflect_fill_crops_match_a_reflect_padded_image(sample_dataset, padding):
    x = sample_dataset.train_images[:64]
    aug, p = params(AugmentConfig(crop_padding=padding, crop_fill="reflect", jitter_prob=0.0, erase_prob=0.0), n=64, seed=3)
    out = aug.apply(x, p)
    padded = torch.nn.functional.pad(x.float(), (padding,) * 4, mode="reflect")  # torch's own reflection is the reference
    ref = torch.stack([padded[i, :, dy : dy + 32, dx : dx + 32] for i, (dy, dx) in enumerate(zip(p["dy"].tolist(), p["dx"].tolist()))])
    ref = torch.where(p["flip"][:, None, None, None], ref.flip(-1), ref)
    ref = (ref / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    zero = BatchAugment(AugmentConfig(crop_padding=padding, jitter_prob=0.0, erase_prob=0.0), MEAN, STD).apply(x, p)
    assert not torch.allclose(zero, out), "the zero fill shows black borders where reflect mirrors the image"


def test_output_dtype_layout_and_normalization(sample_dataset):
    aug = BatchAugment(None, MEAN, STD, dtype=torch.bfloat16, channels_last=True)
    out = aug(sample_dataset.train_images[:8])
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    plain = BatchAugment(None, sample_dataset.mean, sample_dataset.std)(sample_dataset.train_images)
    assert plain.mean(dim=(0, 2, 3)).abs().max() < 0.05 and (plain.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05


def test_seeded_runs_repeat_exactly(sample_dataset):
    aug = BatchAugment(AugmentConfig(), MEAN, STD)
    x = sample_dataset.train_images[:64]
    a = aug(x, torch.Generator().manual_seed(11))
    b = aug(x, torch.Generator().manual_seed(11))
    c = aug(x, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_config_values():
    with pytest.raises(ValueError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="hue"):
        AugmentConfig(hue=0.7)
    with pytest.raises(ValueError, match="crop_fill must be zero or reflect, got 'edge'"):
        AugmentConfig(crop_fill="edge")


# --- loader ---------------------------------------------------------------------------------------

def _loader(n, batch, train, rank=0, world=1, seed=0):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    y = torch.arange(n)
    return TensorLoader(x, y, batch, train=train, transform=lambda im, g: im, seed=seed, rank=rank, world_size=world)


def test_train_loader_shuffles_each_epoch_and_drops_last():
    loader = _loader(100, 32, train=True)
    assert len(loader) == 3
    loader.set_epoch(0)
    e0 = torch.cat([y for _, y in loader])
    loader.set_epoch(1)
    e1 = torch.cat([y for _, y in loader])
    assert len(e0) == 96 and len(set(e0.tolist())) == 96
    assert not torch.equal(e0, e1)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in loader]), e0)


def test_eval_loader_sees_every_image_once_across_ranks():
    seen = []
    for rank in range(3):
        loader = _loader(101, 16, train=False, rank=rank, world=3)
        first = torch.cat([y for _, y in loader])
        assert torch.equal(torch.cat([y for _, y in loader]), first)  # a second pass starts again from the top
        seen.append(first)
    assert sorted(torch.cat(seen).tolist()) == list(range(101))


def test_train_shards_are_disjoint():
    shards = []
    for rank in range(2):
        loader = _loader(100, 10, train=True, rank=rank, world=2)
        loader.set_epoch(3)
        shards.append(set(torch.cat([y for _, y in loader]).tolist()))
    assert len(shards[0]) == len(shards[1]) == 50 and not shards[0] & shards[1]


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(ValueError, match="lower --batch-size"):
        _loader(10, 32, train=True)
