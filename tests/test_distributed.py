"""Several processes on the CPU with gloo: the same code path torchrun runs on GPUs with NCCL."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from preactresnet.checkpoint import load_state
from preactresnet.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--data-dir", "sample", "--model", "preactresnet18", "--width-mult", "0.125", "--epochs", "1",
    "--max-steps-per-epoch", "3", "--amp", "off", "--no-progress", "--profile", "off", "--deterministic",
    "--crop-padding", "0", "--flip-prob", "0", "--jitter-prob", "0", "--erase-prob", "0", "--mix-prob", "0",
    "--optimizer", "sgd", "--lr", "0.05", "--warmup-epochs", "0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_free_model():
    """BatchNorm -> GroupNorm(1, C): normalization per image, so B + B images on two processes
    compute exactly what 2B images compute on one (BatchNorm's batch statistics would not)."""
    import preactresnet.training as training
    from preactresnet.models import create_model

    def build(name, **kwargs):
        model = create_model(name, **kwargs)
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(parent, child_name, torch.nn.GroupNorm(1, child.num_features))
        return model

    training.create_model = build


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _batch_free_model()
    from preactresnet.distributed import cleanup
    from preactresnet.training import Trainer

    cfg, explicit = parse_args(argv)
    try:
        Trainer.from_config(cfg, explicit, out=lambda *a: None).fit()
    finally:
        cleanup()


def test_two_processes_match_one_with_double_batch(tmp_path):
    out = ["--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "fig")]
    mp.spawn(_worker, args=(2, _free_port(), [*COMMON, *out, "--batch-size", "16", "--run-name", "ddp"]), nprocs=2, join=True)
    mp.spawn(_worker, args=(1, _free_port(), [*COMMON, *out, "--batch-size", "32", "--run-name", "single"]), nprocs=1, join=True)
    ddp = load_file(tmp_path / "ck" / "ddp" / "last.safetensors")
    single = load_file(tmp_path / "ck" / "single" / "last.safetensors")
    assert ddp.keys() == single.keys() and not any(k.startswith("module.") for k in ddp)
    for k in single:
        assert torch.allclose(ddp[k], single[k], atol=1e-5, rtol=1e-4), k
    assert len(list((tmp_path / "runs" / "ddp").glob("events.out.tfevents.*"))) == 1  # only rank 0 logs


def test_torchrun_launch_then_single_process_resume(tmp_path):
    out = ["--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "fig")]
    args = [a for a in COMMON if a != "--deterministic"]
    args[args.index("--epochs") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *args, *out, "--batch-size", "16", "--run-name", "tr"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test accuracy") == 1  # rank 0 alone reports
    assert "(" in done.stdout and "/2000)" in done.stdout  # every test image counted once across ranks
    state = load_state(tmp_path / "ck" / "tr" / "last.state.pt")
    assert state["step"] == 6 and not any(k.startswith("module.") for k in state["model"])
    # The distributed run's checkpoint resumes in one process (the finished run re-evaluates).
    from preactresnet.training import Trainer

    cfg, explicit = parse_args(["--resume", str(tmp_path / "ck" / "tr"), "--no-progress"])
    result = Trainer.from_config(cfg, explicit, out=lambda *a: None).fit()
    assert result["final"].total == 2000


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    argv = [*COMMON, "--sync-bn", "--batch-size", "16", "--checkpoint-dir", str(tmp_path)]
    with pytest.raises(mp.ProcessRaisedException, match="--sync-bn needs GPUs"):
        mp.spawn(_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
