"""Every entry point on a GPU machine, simulated on the CPU: torch.cuda reports GPUs, `set_device` checks its
argument the way torch does, and the run is stopped at its first move of a tensor or model to the GPU.

On a one-GPU machine `--device auto` used to resolve to a bare `cuda`, which `torch.cuda.set_device` refuses
("Expected a torch.device with a specified index"): `python train.py` raised at start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import png_bytes
from test_training import run_args

from preactresnet.cli import main_checkpoints, main_optimize, main_predict, main_test, main_train


class ReachedGPU(BaseException):
    """Raised at the first move to the GPU; a BaseException, so no handler of the code under test swallows it."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One tiny run trained on the CPU, for the commands that evaluate a checkpoint."""
    tmp = tmp_path_factory.mktemp("gpu-entry")
    main_train(run_args(tmp, "--epochs", "1", "--max-steps-per-epoch", "1", "--tta", "none", "--device", "cpu",
                        "--run-name", "tiny"))
    return tmp / "ck" / "tiny" / "best.safetensors"


def fake_gpus(monkeypatch, count: int, local_rank: int | None) -> dict:
    """torch.cuda as on a machine with `count` GPUs (this process torchrun's `local_rank` if given)."""
    seen = {"set_device": [], "to": []}
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",  # what optimize_system's report reads
                        lambda device=None: SimpleNamespace(name="simulated GPU", major=9, minor=0, total_memory=2**37))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**36, 2**37))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen["set_device"].append(torch.cuda._get_device_index(device)))

    def stop_at_gpu(original):
        def to(self, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if device is not None and device.type == "cuda":
                seen["to"].append(device)
                raise ReachedGPU(device)
            return original(self, *args, **kwargs)
        return to

    monkeypatch.setattr(torch.Tensor, "to", stop_at_gpu(torch.Tensor.to))
    monkeypatch.setattr(torch.nn.Module, "to", stop_at_gpu(torch.nn.Module.to))
    return seen


def entry_points(tmp_path, checkpoint) -> dict:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(torch.zeros(3, 32, 32, dtype=torch.uint8)))
    evaluate = ["--checkpoint", str(checkpoint), "--data-dir", "sample", "--device", "auto"]
    return {
        "train": lambda: main_train(run_args(tmp_path, "--epochs", "1", "--device", "auto")),
        "test": lambda: main_test([*evaluate, "--no-figures", "--fig-dir", str(tmp_path / "fig")]),
        "test_with_checkpoints": lambda: main_checkpoints([str(checkpoint), "--data-dir", "sample", "--device", "auto",
                                                           "--fig-dir", str(tmp_path / "fig")]),
        "predict": lambda: main_predict([str(images), "--checkpoint", str(checkpoint), "--device", "auto"]),
        "optimize_system": lambda: main_optimize(["--quick", "--no-priority", "--profile", str(tmp_path / "p.json")]),
    }


@pytest.mark.parametrize("count,local_rank,expected", [(1, None, 0), (4, 3, 3), (1, 3, 0)],
                         ids=["one-gpu", "rank-3-of-4", "one-gpu-per-process"])  # SLURM --gpus-per-task: LOCAL_RANK=3, one GPU
@pytest.mark.parametrize("entry", ["train", "test", "test_with_checkpoints", "predict", "optimize_system"])
def test_every_entry_point_runs_on_an_indexed_gpu(entry, count, local_rank, expected, tmp_path, checkpoint, monkeypatch):
    run = entry_points(tmp_path, checkpoint)[entry]
    seen = fake_gpus(monkeypatch, count, local_rank)
    with pytest.raises(ReachedGPU):
        run()
    assert seen["set_device"] and set(seen["set_device"]) == {expected}, seen
    assert seen["to"] == [torch.device("cuda", expected)], seen


def test_a_gpu_the_machine_lacks_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    fake_gpus(monkeypatch, 1, None)
    with pytest.raises(SystemExit) as exc:
        main_train(run_args(tmp_path, "--epochs", "1", "--device", "cuda:1"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "sees 1 GPU(s); use cuda:0 to cuda:0" in err, err


GPU_SH = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def test_the_gpu_acceptance_run_refuses_a_machine_without_a_gpu_in_one_line(tmp_path):
    script = GPU_SH
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "no CUDA GPU here" in done.stderr, done
    assert not list(tmp_path.iterdir()), "it stops before running anything"


@pytest.mark.slow(90)
def test_every_gpu_acceptance_row_finds_its_line_in_its_cpu_form(tmp_path):
    """bench/gpu.sh with GPU_SH_CPU=1: each row's command, small, on the CPU. Every row must succeed and its
    pattern find a line; every check must find its figure. The CPU's sync counts must be 0 as a GPU's are."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_SH_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(GPU_SH)], env=env, capture_output=True, text=True, timeout=400)
    rows = [line.split("\t") for line in (tmp_path / "table.tsv").read_text().splitlines()]
    names = [r[0] for r in rows]
    assert {"train-one-gpu", "torchrun-two", "test-cuda", "predict-cuda", "export", "throughput-r18", "demo-4-epochs",
            "fast-yaml", "sync-off-muon"} <= set(names), names
    failed = [r for r in rows if r[1] != "ok" or "no line matches" in r[-1] or "not found" in r[-1]]
    assert not failed and done.returncode == 0, (failed, done.stdout[-2000:])
    assert sum(name.startswith("check ") for name in names) == 4
