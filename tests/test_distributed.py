"""Several processes on the CPU with gloo: the code path torchrun runs on GPUs with NCCL.

Most tests fork their ranks from the test process (tests/ranks.py: a second, not a new interpreter per
rank); two launch the real torchrun: a SIGTERM to the launcher, and two nodes on the loopback address.
"""

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ranks import RankFailed, free_port, run_ranks
from safetensors.torch import load_file

from preactresnet.checkpoint import load_state
from preactresnet.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--data-dir", "sample", "--model", "preactresnet18", "--width-mult", "0.125", "--epochs", "1",
    "--max-steps-per-epoch", "3", "--amp", "off", "--no-progress", "--profile", "off", "--deterministic",
    "--crop-padding", "0", "--flip-prob", "0", "--jitter-prob", "0", "--erase-prob", "0", "--mix-prob", "0",
    "--optimizer", "sgd", "--lr", "0.05", "--warmup-epochs", "0", "--tta", "none", "--no-figures",
]


def outputs(tmp_path: Path) -> list[str]:
    return ["--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"), "--fig-dir", str(tmp_path / "fig")]


def _batch_free_model():
    """BatchNorm -> GroupNorm(1, C): normalization per image, so B + B images on two processes
    compute exactly what 2B images compute on one (BatchNorm's batch statistics would not)."""
    import preactresnet.training.parts as training
    from preactresnet.models import create_model

    def build(name, **kwargs):
        model = create_model(name, **kwargs)
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.BatchNorm2d):
                    setattr(parent, child_name, torch.nn.GroupNorm(1, child.num_features))
        return model

    training.create_model = build


def _build(argv):
    from preactresnet.training import Trainer

    cfg, explicit = parse_args(argv)
    return Trainer.from_config(cfg, explicit, out=lambda *a: None)


def _fit_compiling(rank, argv):
    """A forked rank compiles in its own process: inductor's pool of compile workers, started in a fork of a
    process with threads, can wait forever."""
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1
    return _fit(rank, argv)


def _fit(rank, argv, batch_free=False):
    if batch_free:
        _batch_free_model()
    return _build(argv).fit()["final"].accuracy


def test_two_processes_match_one_with_double_batch(tmp_path):
    out = outputs(tmp_path)
    run_ranks(_fit, 2, [*COMMON, *out, "--batch-size", "16", "--run-name", "ddp"], True)
    run_ranks(_fit, 1, [*COMMON, *out, "--batch-size", "32", "--run-name", "single"], True)
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


def test_evaluation_scores_one_model_on_every_rank(tmp_path):
    """Each rank's BatchNorm statistics drift apart in training; the reported test figures must be those of
    the one model rank 0 saves, scored on all 2,000 images in one process."""
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "16", "--max-steps-per-epoch", "4", "--run-name", "bn"]
    accuracy = run_ranks(_fit, 2, argv)
    rows = list(csv.DictReader(open(tmp_path / "runs" / "bn" / "metrics.csv")))
    cfg, explicit = parse_args(["--resume", str(tmp_path / "ck" / "bn"), "--no-progress"])
    from preactresnet.training import Trainer

    alone = Trainer.from_config(cfg, explicit, out=lambda *a: None).fit()["final"]  # a finished run: evaluated again
    assert alone.total == 2000 and accuracy[0] == accuracy[1] == pytest.approx(alone.accuracy, abs=1e-9)
    assert float(rows[-1]["test_loss"]) == pytest.approx(alone.loss, rel=1e-4), "the figures mix two models' statistics"


@pytest.mark.slow(100)
def test_compile_runs_through_the_trainer_alone_and_under_ddp(tmp_path):
    """Item 6: --compile (inductor on the CPU) through the Trainer's steps, evaluation and checkpoint, in one
    process and in two (DDP on gloo): the weights of the run without it, to rounding, with no wrapper prefix. The
    matmul weight gradient (an autograd.Function) in every run: a torch whose compiled DDP refuses it (2.5.1) falls
    back to oneDNN's instead of failing at the first step, as it did whenever --conv-wgrad auto picked the matmul."""
    common, out = [*(a for a in COMMON if a != "--deterministic"), "--conv-wgrad", "matmul"], outputs(tmp_path)
    run_ranks(_fit, 1, [*common, *out, "--batch-size", "16", "--run-name", "eager"])
    for name, world in (("compiled", 1), ("ddp-compiled", 2)):
        run_ranks(_fit_compiling, world, [*common, *out, "--batch-size", str(16 // world), "--run-name", name, "--compile"],
                  timeout=400)
    eager = load_file(tmp_path / "ck" / "eager" / "last.safetensors")
    for name in ("compiled", "ddp-compiled"):
        weights = load_file(tmp_path / "ck" / name / "last.safetensors")
        assert weights.keys() == eager.keys(), f"{name}: {sorted(set(weights) ^ set(eager))[:4]}"
    compiled = load_file(tmp_path / "ck" / "compiled" / "last.safetensors")
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], atol=1e-3, rtol=1e-3), k


def _bucket_views(rank, argv):
    """Gradient storage after each zero_grad of 3 real steps: in place (DDP's buckets) or dropped (None)."""
    t = _build(argv)
    seen, zero_grad = [], t.step_parts.optimizer.zero_grad

    def watched(set_to_none=True):
        zero_grad(set_to_none=set_to_none)
        seen.append([None if p.grad is None else p.grad.data_ptr() for p in t.net.model.parameters()])

    t.step_parts.optimizer.zero_grad = watched
    t.loaders.train.set_epoch(0)
    t.train_steps(3)
    return t.net.train_module.gradient_as_bucket_view, seen


def test_ddp_gradients_stay_in_its_buckets_across_steps(tmp_path):
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "8"]
    for as_view, seen in run_ranks(_bucket_views, 2, argv):
        assert as_view and len(seen) == 3
        assert None not in seen[1] and seen[1] == seen[2], "zero_grad dropped the bucket views: fresh gradients each step"


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(RankFailed, match="--sync-bn needs GPUs"):
        run_ranks(_fit, 2, [*COMMON, "--sync-bn", "--batch-size", "16", *outputs(tmp_path)])


def _resolved(rank, argv, profile_dir):
    """resolve_config with a different system profile on each rank (as on two machines)."""
    import preactresnet.training.resolve as resolve
    from preactresnet.distributed import init_distributed

    resolve.load_profile = lambda *a, **k: {"path": f"{profile_dir}/rank{rank}.json", "settings": {"channels_last": "on" if rank else "off",
                                                                                                  "batch_size": 16 * (rank + 1)}}
    cfg, explicit = parse_args(argv)
    run = resolve.resolve_config(cfg, explicit, init_distributed(cfg.device), warn=lambda *a: None)
    return run.cfg, run.profile["path"]


def test_every_rank_trains_with_rank_zeros_resolved_config(tmp_path):
    (cfg0, path0), (cfg1, path1) = run_ranks(_resolved, 2, [*COMMON, *outputs(tmp_path)], str(tmp_path))
    assert cfg0 == cfg1 and path0 == path1 == f"{tmp_path}/rank0.json" and cfg1.batch_size == 16


def test_process_group_backend_serves_cpu_and_cuda_tensors(monkeypatch):
    import torch.distributed as dist

    import preactresnet.distributed as d

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("group", kw["backend"])) or "gloo-group")
    info = d.init_distributed("auto")
    assert calls == [("init", "cpu:gloo,cuda:nccl"), ("group", "gloo"), ("group", "gloo")] and info.host_group == "gloo-group"
    calls.clear()
    d.init_distributed("cpu")
    assert calls == [("init", "gloo"), ("group", "gloo")]  # the default group serves host values; the data wait has its own


def test_ranks_sharing_a_gpu_use_gloo_for_cuda_tensors(monkeypatch):
    """NCCL refuses two ranks on one device ("Duplicate GPU detected"): two processes on a one-GPU machine
    (bench/gpu.sh's DDP row) take gloo for CUDA tensors; ranks shown one GPU each keep NCCL."""
    import preactresnet.distributed as d

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(d.CUDA_BACKEND_ENV, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert d.backend_for(True) == "cpu:gloo,cuda:gloo"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # a launcher that shows each process its own GPU
    assert d.backend_for(True) == "cpu:gloo,cuda:nccl"
    monkeypatch.setenv(d.CUDA_BACKEND_ENV, "gloo")
    assert d.backend_for(True) == "cpu:gloo,cuda:gloo" and d.backend_for(False) == "gloo"


def _budgeted(rank, argv):
    """Calibration: rank 0 takes 0.125 s per step, rank 1 0.25 s, each evaluation 0.5 s (virtual seconds). In the run,
    rank 1 slows to 0.5 s per step from step 4: both ranks must re-plan alike, at the same steps."""
    import pytest
    from virtual_clock import install

    def seconds(t):
        slow = rank == 1 and t.budget is not None and t.step >= 4
        return 0.5 if slow else (0.125 if rank == 0 else 0.25)

    install(pytest.MonkeyPatch(), seconds, eval_seconds=0.5)
    t = _build(argv)
    first = (t.plan.epochs, t.plan.total_steps)
    t.fit()
    return first, t.plan.state_dict(), t.step, t.budget.replans


@pytest.mark.slow(8)
def test_time_budget_under_torchrun_plans_and_replans_alike_on_all_ranks(tmp_path):
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "16", "--warmup-epochs", "1"]
    del argv[argv.index("--epochs"):argv.index("--epochs") + 2]  # the budget chooses them
    ranks = run_ranks(_budgeted, 2, [*argv, "--time-budget", "4s"], timeout=90)
    assert ranks[0] == ranks[1], ranks
    # 4 s at the slowest rank's 0.25 s/step + 0.5 s/evaluation: 3 epochs of 3 steps; rank 1's slowdown shortens it
    first, plan, steps, replans = ranks[0]
    assert first == (3, 9) and replans >= 1 and steps == plan["total_steps"] < 9, ranks[0]


def _fit_until_stopped(t):
    """(the step it stopped at, seconds from the signal to the stop), or (step, None) if it ran to the end."""
    from preactresnet.training import Stopped

    try:
        t.fit()
    except Stopped:
        return t.step, time.monotonic() - getattr(t, "signalled", time.monotonic())
    return t.step, None


def _slow_steps_then_signal(rank, argv, seconds_per_step, at):
    """Steps slowed to `seconds_per_step`; rank 1 gets SIGTERM after step `at`; both must stop soon after."""
    t = _build(argv)
    step = t._step

    def slow(x, y):
        time.sleep(seconds_per_step)
        loss = step(x, y)
        if rank == 1 and t.step == at:
            os.kill(os.getpid(), signal.SIGTERM)
            t.signalled = time.monotonic()
        return loss

    t._step = slow
    return _fit_until_stopped(t)


def test_a_stop_is_agreed_within_seconds_between_log_lines(tmp_path):
    """Log every 50 steps of 0.3 s (15 s apart); SIGTERM on one rank after step 3: both ranks stop at the
    same step within about a second, far before the next log line."""
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "8", "--max-steps-per-epoch", "40", "--log-interval", "50"]
    (step0, _), (step1, took) = run_ranks(_slow_steps_then_signal, 2, argv, 0.3, 3, timeout=60)
    assert step0 == step1 and 3 <= step1 <= 10, (step0, step1)
    assert took is not None and took < 3.0, took
    state = load_state(next((tmp_path / "ck").glob("*/last.state.pt")))
    assert state["step"] == step0 and [r["loader"]["batch"] for r in state["ranks"]] == [step0, step0]


def _signal_after_an_agreement(rank, argv):
    """Rank 1 gets SIGTERM just after the ranks agreed, at the end of the epoch's steps, not to stop."""
    t, sent = _build(argv), []
    agreed = t.stop.agreed

    def late(summed):
        decided = agreed(summed)
        if rank == 1 and t.step == 3 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this returns
            t.signalled = time.monotonic()
        return decided

    t.stop.agreed = late
    return _fit_until_stopped(t)


def test_a_signal_just_after_an_agreement_waits_for_the_next_one(tmp_path):
    """A SIGTERM between the ranks' agreement and the branch it decides: had rank 1 acted on it alone, it would save
    (a gather) while rank 0 evaluates (an all-reduce), and both would wait for the process group's timeout. It is
    carried to the next agreement, before the first evaluation batch: both stop there, at step 3, and save."""
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "8", "--epochs", "2", "--log-interval", "50"]
    (step0, _), (step1, took) = run_ranks(_signal_after_an_agreement, 2, argv, timeout=60)
    assert step0 == step1 == 3 and took is not None and took < 10, (step0, step1, took)
    state = load_state(next((tmp_path / "ck").glob("*/last.state.pt")))
    assert state["step"] == 3 and [r["loader"]["batch"] for r in state["ranks"]] == [3, 3]


def _torchrun(nproc: int, *args: str, node: tuple[int, int] | None = None) -> list[str]:
    where = ["--standalone"] if node is None else ["--nnodes", "2", "--node_rank", str(node[0]), "--master_addr",
                                                   "127.0.0.1", "--master_port", str(node[1])]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *args]


@pytest.mark.slow(35)
def test_sigterm_under_torchrun_saves_and_resumes_bit_identically(tmp_path, capsys):
    """What a cluster does: SIGTERM to the launcher at a random step; both ranks stop at the same step (mid-epoch,
    at an epoch's start or in its evaluation: wherever the signal lands)
    and exit by themselves (not killed by the launcher after its 30 s grace), rank 0 saves every rank's stream; a 2-process resume matches an unbroken run bit for bit,
    and a 1-process resume is refused in one line (README: resume on the same number of processes)."""
    demo = [  # 36 steps: the stop may land in any epoch; the test, reading a pipe on a busy CPU, may see 'step 10' seconds late
        "--config", str(ROOT / "configs/demo.yaml"), "--epochs", "3", "--max-steps-per-epoch", "12", "--deterministic",
        "--amp", "off", "--muon-ns-dtype", "fp32",  # the same on every CPU kind, and nothing timed per launch
        "--batch-size", "32", "--tta", "none",  # what is checked (where it stops, what is saved, the resume) needs neither
        "--no-progress", "--profile", "off", "--log-interval", "1", "--no-figures", *outputs(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PREACTRESNET_DIST_TIMEOUT": "30"}
    at = random.randint(2, 10)  # a random step of epoch 1 (of 3, 12 steps each)
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
    assert "forcefully exiting" not in rest, rest[-3000:]  # the launcher's SIGKILL after its 30 s grace
    assert launcher.returncode != 0 and "stopped: saved" in rest, rest[-3000:]
    state = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    batch, step = state["ranks"][0]["loader"]["batch"], state["step"]
    assert state["world_size"] == 2 and at <= step <= 36 and step == 12 * state["epoch"] + batch, (at, state["epoch"], batch)
    assert [r["loader"]["batch"] for r in state["ranks"]] == [batch, batch]
    assert not torch.equal(state["ranks"][0]["loader"]["generator"], state["ranks"][1]["loader"]["generator"])

    from preactresnet.cli import main_train

    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main_train(["--resume", str(tmp_path / "ck" / "cut")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and "saved by 2 process(es) and this run has 1" in err, err

    run_ranks(_fit, 2, ["--resume", str(tmp_path / "ck" / "cut"), "--no-progress"])  # forked ranks, torchrun's path
    run_ranks(_fit, 2, [*demo, "--run-name", "whole"])
    a = load_file(tmp_path / "ck" / "whole" / "last.safetensors")
    b = load_file(tmp_path / "ck" / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), f"stopped after step {step}: weights differ from the unbroken run"


def _timed_load(rank, argv, log, slower=1.0):
    """A rank whose data loading writes when it began and ended (each node's first rank takes `slower` s longer)."""
    import preactresnet.training.parts as training

    real = training.load_dataset

    def load(*args, **kwargs):
        began = time.time()
        if int(os.environ["LOCAL_RANK"]) == 0:
            time.sleep(slower)
        data = real(*args, **kwargs)
        with open(log, "a") as f:
            f.write(f"{rank} {began} {time.time()}\n")
        return data

    training.load_dataset = load
    _build(argv)


def test_each_nodes_first_process_builds_the_data_before_its_neighbours_read_it(tmp_path):
    log = tmp_path / "loads.txt"
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "16"]
    run_ranks(_timed_load, 4, argv, str(log), local_ranks=[0, 1, 0, 1])  # two nodes of two processes
    loads = {int(r): (float(b), float(e)) for r, b, e in (line.split() for line in log.read_text().splitlines())}
    first_done = max(loads[0][1], loads[2][1])
    assert loads[1][0] >= first_done and loads[3][0] >= first_done, "a neighbour read before its node's data was built"
    assert abs(loads[0][0] - loads[2][0]) < 1.0, "the nodes' first processes build at the same time, not in turn"


@pytest.mark.slow(40)
def test_two_nodes_without_a_shared_folder(tmp_path, monkeypatch):
    """Two torchrun launches (node ranks 0 and 1, two processes each) on the loopback address, each in its own
    folder: each node builds its own data cache, node 0's rank 0 alone writes and reports; the result
    resumes in one process."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PREACTRESNET_DIST_TIMEOUT": "30"}
    args = [a for a in COMMON if a != "--deterministic"] + ["--batch-size", "8", "--run-name", "nodes", "--figures"]
    folders = [tmp_path / "node0", tmp_path / "node1"]
    launches = []
    for node, folder in enumerate(folders):
        folder.mkdir()
        launches.append(subprocess.Popen(_torchrun(2, *args, node=(node, port)), cwd=folder, env=env, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = [p.communicate(timeout=90) for p in launches]  # about 18 s on an AMX CPU
    for p, (out, err) in zip(launches, done):
        assert p.returncode == 0, err[-3000:]
    found = re.search(r"final test accuracy: ([\d.]+)% \((\d+)/(\d+)\)", done[0][0])
    assert found and int(found[3]) == 2000, "every test image counted once across the 4 ranks"
    assert "final test accuracy" not in done[1][0] and not (folders[1] / "checkpoints").exists()
    assert (folders[0] / "fig" / "nodes" / "training_curves.png").is_file() and not (folders[1] / "fig").exists()
    for folder in folders:
        assert len(list((folder / "data" / "cache").glob("*.safetensors"))) == 1, f"{folder.name} built no cache of its own"
    state = load_state(folders[0] / "checkpoints" / "nodes" / "last.state.pt")
    assert state["world_size"] == 4 and state["step"] == 3
    monkeypatch.chdir(folders[0])  # the resumed run's relative runs/ and fig/ land in node 0's folder, not the checkout
    cfg, explicit = parse_args(["--resume", str(folders[0] / "checkpoints" / "nodes"), "--no-progress"])
    from preactresnet.training import Trainer

    assert Trainer.from_config(cfg, explicit, out=lambda *a: None).fit()["final"].total == 2000


def test_a_data_build_longer_than_the_collective_timeout_is_waited_for(tmp_path):
    """Each node's first process may take long to build the data: that wait has its own timeout
    (PREACTRESNET_DATA_TIMEOUT), not the collectives' (here 1 s, the build 3 s)."""
    log = tmp_path / "loads.txt"
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "16"]
    run_ranks(_timed_load, 2, argv, str(log), 3.0, env={"PREACTRESNET_DIST_TIMEOUT": "1", "PREACTRESNET_DATA_TIMEOUT": "30"})
    assert len(log.read_text().splitlines()) == 2


def _signal_during_evaluation(rank, argv, seconds_per_batch):
    """Evaluation batches slowed to `seconds_per_batch`; rank 1 gets SIGTERM as the first evaluation begins."""
    t = _build(argv)
    forward = t.net.model.forward

    def slow(x):
        if not t.net.model.training:
            if rank == 1 and not hasattr(t, "signalled"):
                t.signalled = time.monotonic()
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(seconds_per_batch)
        return forward(x)

    t.net.model.forward = slow
    return _fit_until_stopped(t)


@pytest.mark.slow(12)
def test_a_stop_during_evaluation_is_acted_on_within_a_batch(tmp_path):
    """The test split is 2 evaluation batches per rank of 1 s each: SIGTERM on one rank as the evaluation
    begins stops both after the batch in progress, saves the epoch's steps as done, and the resume
    evaluates the epoch again and goes on to the same weights as a run never stopped."""
    argv = [*COMMON, *outputs(tmp_path), "--batch-size", "250", "--max-steps-per-epoch", "2", "--epochs", "2",
            "--run-name", "cut"]
    (step0, _), (step1, took) = run_ranks(_signal_during_evaluation, 2, argv, 1.0, timeout=60)
    assert step0 == step1 == 2 and took is not None and took < 2.5, (step0, step1, took)
    state = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    assert state["epoch"] == 0 and [r["loader"]["batch"] for r in state["ranks"]] == [2, 2] and not state["history"]
    run_ranks(_fit, 2, ["--resume", str(tmp_path / "ck" / "cut"), "--no-progress"])
    run_ranks(_fit, 2, [*argv[:-1], "whole"])
    a, b = load_file(tmp_path / "ck" / "whole" / "last.safetensors"), load_file(tmp_path / "ck" / "cut" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
