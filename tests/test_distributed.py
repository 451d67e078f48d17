"""Several processes on the CPU with gloo: the same code path torchrun runs on GPUs with NCCL."""

import csv
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
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
    "--optimizer", "sgd", "--lr", "0.05", "--warmup-epochs", "0", "--tta", "none",
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
    with open(tmp_path / "runs" / "ddp" / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    # The run's images/s counts both ranks: 3 steps x 16 images x 2 ranks, within the CSV's rounding
    # (images/s to 0.1, seconds to 0.01; a short epoch makes the second matter).
    ips, seconds = float(row["images_per_sec"]), float(row["epoch_seconds"])
    assert (ips - 0.05) * (seconds - 0.005) <= 3 * 16 * 2 <= (ips + 0.05) * (seconds + 0.005), (ips, seconds)


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
    found = re.search(r"final test accuracy: ([\d.]+)% \((\d+)/(\d+)\)", done.stdout)
    assert found and int(found[3]) == 2000, "every test image counted once across ranks"
    assert float(found[1]) == pytest.approx(100 * int(found[2]) / 2000, abs=0.005)
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


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]


def test_sigterm_under_torchrun_saves_mid_epoch_and_resumes_bit_identically(tmp_path):
    """What a cluster does: SIGTERM to the launcher at a random step; both ranks stop at the same step
    within 30 s, rank 0 saves every rank's stream; a 2-process resume matches an unbroken run bit for bit,
    and a 1-process resume is refused in one line (README: resume on the same number of processes)."""
    demo = [
        "--config", "configs/demo.yaml", "--epochs", "2", "--max-steps-per-epoch", "12", "--deterministic",
        "--amp", "off", "--muon-ns-dtype", "fp32",  # the same on every CPU kind, and nothing timed per launch
        "--batch-size", "32", "--tta", "none",  # what is checked (where it stops, what is saved, the resume) needs neither
        "--no-progress", "--profile", "off", "--log-interval", "1", "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "fig"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    whole = subprocess.run(_torchrun(2, *demo, "--run-name", "whole"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]

    at = random.randint(2, 10)  # a random step of epoch 1 (12 steps)
    launcher = subprocess.Popen(_torchrun(2, *demo, "--run-name", "cut"), cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    log = []
    for line in launcher.stdout:
        log.append(line)
        if line.strip().startswith(f"step {at}/"):
            launcher.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            break
    else:
        pytest.fail(f"no 'step {at}/' line:\n" + "".join(log)[-3000:])
    rest = launcher.communicate(timeout=60)[0]
    took = time.monotonic() - sent
    print(f"SIGTERM after step {at}: the launcher and both processes were gone {took:.1f} s later")  # pytest -s shows it
    assert took < 30, f"the processes took {took:.0f} s to stop"
    assert launcher.returncode != 0 and "stopped: saved" in rest, rest[-3000:]
    state = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    batch = state["ranks"][0]["loader"]["batch"]
    assert state["world_size"] == 2 and state["epoch"] == 0 and at <= batch < 12, (at, batch)
    assert [r["loader"]["batch"] for r in state["ranks"]] == [batch, batch] and state["step"] == batch
    assert not torch.equal(state["ranks"][0]["loader"]["generator"], state["ranks"][1]["loader"]["generator"])

    one = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "ck" / "cut")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and one.stderr.count("\n") == 1, one.stderr[-3000:]
    assert "saved by 2 process(es) and this run has 1" in one.stderr

    resumed = subprocess.run(_torchrun(2, "--resume", str(tmp_path / "ck" / "cut"), "--no-progress"), cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "ck" / "whole" / "last.safetensors")
    b = load_file(tmp_path / "ck" / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), f"stopped after step {batch}: weights differ from the unbroken run"


def _timed_load_worker(rank: int, world: int, port: int, argv: list[str], log: str) -> None:
    """A worker whose data loading writes when it began and ended (rank 0 takes a second longer)."""
    import preactresnet.training as training

    real = training.load_dataset

    def load(*args, **kwargs):
        began = time.time()
        if rank == 0:
            time.sleep(1.0)
        data = real(*args, **kwargs)
        with open(log, "a") as f:
            f.write(f"{rank} {began} {time.time()}\n")
        return data

    training.load_dataset = load
    _worker(rank, world, port, argv)


def test_rank_zero_builds_the_data_before_the_others_read_it(tmp_path):
    log = tmp_path / "loads.txt"
    argv = [*COMMON, "--batch-size", "16", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
            "--fig-dir", str(tmp_path / "fig")]
    mp.spawn(_timed_load_worker, args=(2, _free_port(), argv, str(log)), nprocs=2, join=True)
    loads = {int(r): (float(b), float(e)) for r, b, e in (line.split() for line in log.read_text().splitlines())}
    assert loads[1][0] >= loads[0][1], "rank 1 began reading before rank 0 had finished downloading and caching"
