"""Shared fixtures: the real CIFAR-10 archive (fails in CI when missing), small real datasets, temp dirs."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

try:
    import fcntl  # POSIX: a lock for the workers of one run; elsewhere each worker decodes on its own
except ImportError:
    fcntl = None
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = Path(os.environ.get("CIFAR10_JPEG", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))


def pytest_configure(config):
    """Under pytest-xdist (`make test`: one worker per core) each worker and what it launches gets its share of the
    cores: torch's default of one thread per core in every worker would put n x n threads on n cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch  # in the workers only: the xdist controller never imports torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # train.py and torchrun launched by tests inherit it
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The slow tests first, longest first (`slow(seconds)`: about what it takes under `make test`): workers that
    take tests as they finish then end together, where the longest last would leave one worker running it alone."""

    def seconds(item):
        mark = item.get_closest_marker("slow")
        return mark.args[0] if mark and mark.args else (5 if mark else 0)

    items.sort(key=seconds, reverse=True)


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    """The real CIFAR-10 JPEG archive: in CI (CI=true) its absence is a failure, elsewhere a skip."""
    if not SHARED_ARCHIVE.is_file():
        message = f"real CIFAR-10 archive not found at {SHARED_ARCHIVE} (set CIFAR10_JPEG to its path)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def shared_cache(shared_archive, tmp_path_factory):
    """The real archive decoded once per test run: (cache folder, dataset). Under pytest-xdist the first worker
    that needs it decodes it, and the others wait for its cache and read it."""
    from preactresnet.data import load_dataset

    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "shared-cache"  # the run's, not the worker's
    cache.mkdir(exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        return cache, load_dataset("cifar10", shared_archive, cache_dir=cache)


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """The bundled sample (real CIFAR-10 images), loaded once through the normal path."""
    from preactresnet.data import load_dataset

    return load_dataset("cifar10", "sample", cache_dir=tmp_path_factory.mktemp("cache"))


def write_tree(root: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str], split: str, fmt: str = "png") -> None:
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels.tolist())):
        d = root / split / classes[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:05d}.{fmt}")


def tar_folder(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"cifar/{split}")
    return out


def write_official(root: Path, train_x, train_y, test_x, test_y, classes) -> Path:
    """The official python release layout (cifar-10-batches-py/), written with pickle protocol 2."""
    import pickle

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(train_y)), 5)
    for i, idx in enumerate(chunks, start=1):
        batch = {b"data": train_x[idx].reshape(len(idx), -1).numpy(), b"labels": train_y[idx].tolist()}
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {b"data": test_x.reshape(len(test_y), -1).numpy(), b"labels": test_y.tolist()}
    (d / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in classes]}, protocol=2))
    return d


@pytest.fixture()
def small_real(sample_dataset):
    """40 training and 20 test real images (4 and 2 per class) as tensors."""
    import torch

    ds = sample_dataset
    tr = torch.cat([(ds.train_labels == c).nonzero().flatten()[:4] for c in range(10)])
    te = torch.cat([(ds.test_labels == c).nonzero().flatten()[:2] for c in range(10)])
    return ds.train_images[tr], ds.train_labels[tr], ds.test_images[te], ds.test_labels[te], ds.classes


def png_bytes(img: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def keep_threads():
    """A test that applies a profile or times thread counts leaves the worker's own thread count as it found it."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_system_profile(monkeypatch, tmp_path_factory):
    """Tests never pick up a profile that optimize_system.py wrote on this machine."""
    import preactresnet.profile as profile

    monkeypatch.setattr(profile, "PROFILE_PATH", tmp_path_factory.getbasetemp() / "no-profile" / "profile.json")


@pytest.fixture(autouse=True)
def session_precision_cache(monkeypatch, tmp_path_factory):
    """--amp auto times each model shape once per test session (subprocesses included), never reading a cache
    this machine wrote before."""
    import preactresnet.precision as precision

    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "precision-cache" / "precision.json"))
