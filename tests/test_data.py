import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from conftest import png_bytes, tar_folder, write_official, write_tree
from preactresnet.data import DataError, load_dataset
from preactresnet.data import cache as cache_mod
from preactresnet.data import sources


def test_channel_stats_equal_the_float64_mean_and_std():
    x = torch.randint(0, 256, (301, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, 2] //= 3  # channels of different spread
    mean, std = cache_mod.channel_stats(x)
    xf = x.to(torch.float64) / 255
    assert mean == tuple(round(v, 4) for v in xf.mean(dim=(0, 2, 3)).tolist())
    assert std == tuple(round(v, 4) for v in xf.std(dim=(0, 2, 3), unbiased=False).tolist())


# --- real data -----------------------------------------------------------------------------------

@pytest.mark.slow(10)
def test_shared_archive_full_cifar10(shared_archive, shared_cache, monkeypatch):
    cache, ds = shared_cache
    assert ds.train_images.shape == (50_000, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    # Mean as published for CIFAR-10; JPEG smooths the pixels, so its std is a little below 0.2470.
    assert np.allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=2e-3)
    assert np.allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=3e-3)

    # The second load comes from the cache: decoding is never reached.
    monkeypatch.setattr(cache_mod, "read_source", lambda *a: pytest.fail("cache missed"))
    again = load_dataset("cifar10", shared_archive, cache_dir=cache)
    assert torch.equal(again.train_images, ds.train_images) and torch.equal(again.test_labels, ds.test_labels)


def test_cache_matches_direct_decode(shared_archive, shared_cache):
    from PIL import Image

    cache, _ = shared_cache
    ds = load_dataset("cifar10", shared_archive, cache_dir=cache)  # from the cache file this time
    with tarfile.open(shared_archive) as tar:
        for name, split, index in (("train/cat/0000.jpg", "train", 3 * 5000), ("test/truck/0999.jpg", "test", 9999)):
            member = next(m for m in tar.getmembers() if m.name.endswith(name))
            img = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
            x = ds.train_images if split == "train" else ds.test_images
            assert torch.equal(x[index], torch.from_numpy(img.copy()).permute(2, 0, 1))


def test_bundled_sample_loads_offline(sample_dataset):
    ds = sample_dataset
    assert len(ds.train_labels) == 10_000 and len(ds.test_labels) == 2_000
    assert torch.bincount(ds.train_labels).tolist() == [1000] * 10
    assert torch.bincount(ds.test_labels).tolist() == [200] * 10
    assert sources.SAMPLE_FILE.stat().st_size < 8 * 2**20


# --- every source gives the same tensors ----------------------------------------------------------

def test_sources_agree(small_real, tmp_path):
    tx, ty, vx, vy, classes = small_real
    tree = tmp_path / "tree"
    write_tree(tree, tx, ty, classes, "train")
    write_tree(tree, vx, vy, classes, "test")
    archive = tar_folder(tree, tmp_path / "tree.tar.gz")
    official = write_official(tmp_path / "official", tx, ty, vx, vy, classes)
    official_tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(official_tgz, "w:gz") as tar:
        tar.add(official, arcname="cifar-10-batches-py")

    loaded = [load_dataset("cifar10", p, cache_dir=tmp_path / f"c{i}") for i, p in enumerate([tree, archive, official.parent, official, official_tgz])]
    order = torch.argsort(ty * 1000 + torch.arange(len(ty)))  # trees sort by class, then file name
    for ds in loaded:
        assert ds.classes == classes
    for ds in loaded[:2]:
        assert torch.equal(ds.train_images, tx[order]) and torch.equal(ds.train_labels, ty[order])
    for ds in loaded[2:]:
        assert torch.equal(ds.train_images, tx) and torch.equal(ds.test_images, vx) and torch.equal(ds.test_labels, vy)


def test_other_sizes_and_modes_are_converted(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls, mode, size in (("a", "L", (64, 48)), ("b", "RGBA", (32, 32))):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new(mode, size, 200).save(d / "x.png")
    ds = load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (2, 3, 32, 32) and ds.classes == ["a", "b"]
    assert int(ds.train_images[0].float().mean()) == 200


# --- errors ----------------------------------------------------------------------------------------

def test_corrupt_image_is_named(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "ok.png").write_bytes(png_bytes(torch.zeros(3, 32, 32, dtype=torch.uint8)))
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "cifar.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(DataError, match="not a readable archive"):
        load_dataset("cifar10", bad, cache_dir=tmp_path / "cache")


def test_missing_dataset_without_download(tmp_path):
    with pytest.raises(DataError, match="no cifar10 data found .*--data-dir"):
        load_dataset("cifar10", tmp_path / "nothing", download=False)


def test_no_network_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path / "data")
    message = str(err.value)
    assert "\n" not in message and "no cifar10 in" in message and "downloading it" in message and "--data-dir" in message
    assert not (tmp_path / "data").exists()  # a mistyped --data-dir leaves no empty folder behind


def test_crafted_batch_pickle_is_refused(small_real, tmp_path):
    tx, ty, vx, vy, classes = small_real
    d = write_official(tmp_path, tx, ty, vx, vy, classes)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_cache_rebuilt_when_source_changes_or_corrupt(small_real, tmp_path, capsys):
    tx, ty, vx, vy, classes = small_real
    tree = tmp_path / "tree"
    write_tree(tree, tx, ty, classes, "train")
    write_tree(tree, vx, vy, classes, "test")
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", tree, cache_dir=cache)
    (tree / "train" / classes[0] / "00000.png").write_bytes(png_bytes(torch.full((3, 32, 32), 7, dtype=torch.uint8)))
    second = load_dataset("cifar10", tree, cache_dir=cache)
    assert not torch.equal(first.train_images, second.train_images)
    assert (second.train_images[0] == 7).all()
    # Flip bytes inside the newest cache file: the checksum notices and the cache is rebuilt.
    newest = max(cache.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0xFF
    newest.write_bytes(bytes(data))
    third = load_dataset("cifar10", tree, cache_dir=cache)
    assert torch.equal(third.train_images, second.train_images)
    assert "rebuilding" in capsys.readouterr().err


def test_validation_split_is_balanced_and_disjoint(sample_dataset):
    from preactresnet.data import split_validation
    import copy

    ds = split_validation(copy.copy(sample_dataset), 1000, seed=1)
    assert len(ds.val_labels) == 1000 and len(ds.train_labels) == 9000
    assert torch.bincount(ds.val_labels).tolist() == [100] * 10
    train_set = {bytes(x.numpy().tobytes()) for x in ds.train_images}  # all 9,000
    assert not any(bytes(x.numpy().tobytes()) in train_set for x in ds.val_images)
    with pytest.raises(DataError, match="--val-size"):
        split_validation(copy.copy(sample_dataset), 5)


def test_cifar100_official_layout(small_real, tmp_path):
    tx, ty, vx, vy, _ = small_real
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    fine_train, fine_test = (ty * 7) % 100, (vy * 7) % 100
    (d / "train").write_bytes(pickle.dumps({b"data": tx.reshape(len(ty), -1).numpy(), b"fine_labels": fine_train.tolist()}, protocol=2))
    (d / "test").write_bytes(pickle.dumps({b"data": vx.reshape(len(vy), -1).numpy(), b"fine_labels": fine_test.tolist()}, protocol=2))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [n.encode() for n in names]}, protocol=2))
    ds = load_dataset("cifar100", tmp_path, cache_dir=tmp_path / "cache")
    assert ds.classes == names and torch.equal(ds.train_labels, fine_train) and torch.equal(ds.test_images, vx)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", tmp_path)
