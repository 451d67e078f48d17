import dataclasses
import math
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from preactresnet.checkpoint import CheckpointError, WeightsMeta, load_state, read_metadata, save_state, save_weights, unwrap_model
from preactresnet.cli import main_train
from preactresnet.config import ResolvedConfig, TrainConfig, parse_args
from preactresnet.plan import RunPlan
from preactresnet.optim import build_mixup, build_scheduler
from preactresnet.training import NonFiniteLoss, Trainer
from preactresnet.training import parts as training_parts
from preactresnet.training.state import resumed_meta

TINY = [
    "--data-dir", "sample", "--model", "preactresnet18", "--width-mult", "0.125", "--batch-size", "32",
    "--no-progress", "--log-interval", "2", "--warmup-epochs", "0.5", "--amp", "off",
    "--tta", "none",  # the end-of-run TTA has its own tests (test_recipe, test_reports)
    "--no-figures",  # 0.5 s per run; the figures have their own tests (end to end, every technique, two nodes)
]


def run_args(tmp_path, *extra):
    return [
        *TINY, "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
        "--fig-dir", str(tmp_path / "fig"), *extra,
    ]


def trainer(tmp_path, *extra):
    cfg, explicit = parse_args(run_args(tmp_path, *extra))
    return Trainer.from_config(cfg, explicit, out=lambda *a: None)


@pytest.mark.slow(4)
def test_end_to_end_on_the_sample(tmp_path):
    t = trainer(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "40", "--optimizer", "sgd", "--lr", "0.1",
                "--mix-prob", "0", "--run-name", "e2e", "--figures")
    result = t.fit()
    run = tmp_path / "ck" / "e2e"
    for name in ("best.safetensors", "last.safetensors", "last.state.pt", "config.yaml"):
        assert (run / name).is_file(), name
    assert list((tmp_path / "runs" / "e2e").glob("events.out.tfevents.*"))
    assert (tmp_path / "runs" / "e2e" / "metrics.csv").read_text().count("\n") == 3
    assert (tmp_path / "fig" / "e2e" / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "fig" / "e2e" / "augmented_batch.png").stat().st_size > 10_000
    assert result["final"].accuracy > 20.0, "two short epochs on real images must beat chance (10%)"
    weights = load_file(run / "best.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    meta = read_metadata(run / "best.safetensors")
    assert meta["model"] == "preactresnet18" and meta["classes"][0] == "airplane" and len(meta["std"]) == 3


def _weights(path):
    return load_file(path)


def interrupt_at(t, step, sig=signal.SIGINT, times=1):
    """Send a real signal (default SIGINT, Ctrl-C) `times` times right after optimizer step `step` of `t`."""
    original = t.step_parts.scheduler.step_update

    def step_update(num_updates, metric=None):
        original(num_updates=num_updates)
        if num_updates == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)

    t.step_parts.scheduler.step_update = step_update


@pytest.mark.slow(5)
def test_resume_is_exact(tmp_path):
    common = ["--epochs", "2", "--max-steps-per-epoch", "3", "--deterministic", "--ema", "--drop-rate", "0.2"]
    trainer(tmp_path, *common, "--run-name", "straight").fit()
    a = trainer(tmp_path, *common, "--run-name", "split")
    # Stop after epoch 1 by interrupting at its last step: the run saves and raises KeyboardInterrupt.
    interrupt_at(a, 3)
    with pytest.raises(KeyboardInterrupt):
        a.fit()
    trainer(tmp_path, "--resume", str(tmp_path / "ck" / "split")).fit()
    straight = _weights(tmp_path / "ck" / "straight" / "last.safetensors")
    resumed = _weights(tmp_path / "ck" / "split" / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    s1 = load_state(tmp_path / "ck" / "straight" / "last.state.pt")
    s2 = load_state(tmp_path / "ck" / "split" / "last.state.pt")
    assert s1["step"] == s2["step"] == 6
    for k in s1["ema"]:
        assert torch.equal(s1["ema"][k], s2["ema"][k]), k


def test_a_resumed_runs_weights_name_the_command_that_started_it_and_each_machine(tmp_path, monkeypatch):
    """The shipped weights' metadata is their recipe: after a resume it must not read `train.py --resume`."""
    cfg, explicit = parse_args(run_args(tmp_path, "--epochs", "3", "--max-steps-per-epoch", "2", "--run-name", "r"))
    first = Trainer.from_config(cfg, explicit, out=lambda *a: None, command="python train.py --epochs 3")
    here, run = first.meta.machine, tmp_path / "ck" / "r"
    interrupt_at(first, 2)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    state = load_state(run / "last.state.pt")
    del state["command"], state["machine"]  # as a state saved before they were kept: the last weights name them
    save_state(run / "last.state.pt", state)
    monkeypatch.setattr(training_parts, "machine_description", lambda device: "another CPU, 2 cores")
    for stop_at in (4, None):  # resumed twice on the other machine: it is named once
        cfg, explicit = parse_args(run_args(tmp_path, "--resume", str(run)))
        resumed = Trainer.from_config(cfg, explicit, out=lambda *a: None, command="python train.py --resume r")
        if stop_at:
            interrupt_at(resumed, stop_at)
            with pytest.raises(KeyboardInterrupt):
                resumed.fit()
            cut = read_metadata(run / "last.safetensors")  # saved at step 4: epoch 1's test score was of other weights
            assert "test_accuracy" not in cut and cut["training"]["steps"] == 4 and cut["epoch"] == 1
        else:
            resumed.fit()
    state = load_state(run / "last.state.pt")
    assert state["step"] == 6
    for name in ("last.safetensors", "best.safetensors"):
        meta = read_metadata(run / name)
        assert meta["command"] == "python train.py --epochs 3", name
        assert meta["machine"] == f"{here}; resumed on another CPU, 2 cores", name
        assert meta["training"]["steps"] == 2 * meta["epoch"] == 2 * meta["training"]["epochs"], name  # 2 steps an epoch
    # minutes on the run's clock, carried over both resumes
    assert read_metadata(run / "last.safetensors")["training"]["minutes"] == round(state["spent_seconds"] / 60, 1)


def test_a_resume_on_a_machine_whose_name_is_part_of_anothers_is_named():
    meta = WeightsMeta(model="m", model_args={}, classes=[], mean=[], std=[], command="resume", machine="RTX 4090")
    resolved = ResolvedConfig(TrainConfig(), state={"command": "first", "machine": "RTX 4090 D"})
    resumed = resumed_meta(meta, resolved)
    assert (resumed.command, resumed.machine) == ("first", "RTX 4090 D; resumed on RTX 4090")


def test_interrupt_mid_epoch_resumes_exactly(tmp_path):
    common = ["--epochs", "1", "--max-steps-per-epoch", "5", "--deterministic"]
    trainer(tmp_path, *common, "--run-name", "straight").fit()
    a = trainer(tmp_path, *common, "--run-name", "cut")
    interrupt_at(a, 2)
    with pytest.raises(KeyboardInterrupt):
        a.fit()
    state = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    assert state["step"] == 2 and state["ranks"][0]["loader"]["batch"] == 2 and state["world_size"] == 1
    trainer(tmp_path, "--resume", "cut", "--checkpoint-dir", str(tmp_path / "ck")).fit()
    x = _weights(tmp_path / "ck" / "straight" / "last.safetensors")
    y = _weights(tmp_path / "ck" / "cut" / "last.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.state.pt"
    save_state(path, {"step": 1, "w": torch.ones(3)})
    wpath = tmp_path / "last.safetensors"
    save_weights(wpath, {"w": torch.ones(3)}, {"model": "m"})

    def dies_halfway(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"step": 2, "w": torch.zeros(3)})
    assert load_state(path)["step"] == 1
    import preactresnet.checkpoint as ck

    def dies(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\x00" * 7)
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", dies)
    with pytest.raises(OSError):
        save_weights(wpath, {"w": torch.zeros(3)}, {"model": "m"})
    assert torch.equal(load_file(wpath)["w"], torch.ones(3))
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_crafted_state_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "last.state.pt"
    torch.save({"x": Evil()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state(path)
    assert not marker.exists()
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state(tmp_path / "trunc.pt")


def test_unwrap_strips_compile_wrapper():
    m = torch.nn.Linear(2, 2)
    assert unwrap_model(torch.compile(m)) is m


def test_learning_rate_curve():
    cfg = TrainConfig(lr=0.1, warmup_lr=0.001, warmup_epochs=2, epochs=10, min_lr=0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt, RunPlan.of(cfg, 50))
    lrs = []
    for step in range(500):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step_update(num_updates=step + 1)
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[50] == pytest.approx(0.001 + 50 * (0.1 - 0.001) / 100)
    assert lrs[100] == pytest.approx(0.1)  # end of warmup: the peak
    assert lrs[100 + 200] == pytest.approx(0.05, rel=1e-6)  # half-way down the cosine
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 399 / 400)))
    assert lrs[-1] < 1e-5


def test_label_smoothing_applied_once_when_mixing():
    cfg = TrainConfig(label_smoothing=0.1, mixup_alpha=1.0, cutmix_alpha=0.0, mix_prob=1.0)
    mixup = build_mixup(cfg, num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8)
    _, target = mixup(x.clone(), y)
    off, on = 0.1 / 10, 1 - 0.1 + 0.1 / 10
    lam = float(target[0, 0] - off) / (on - off)  # sample 0 is class 0 mixed with sample 7 (class 7)
    expected = torch.full((10,), off)
    expected[0] += lam * (on - off)
    expected[7] += (1 - lam) * (on - off)
    assert torch.allclose(target[0], expected, atol=1e-6)
    assert torch.allclose(target.sum(1), torch.ones(8))
    mixup.mixup_enabled = False
    _, plain = mixup(x.clone(), y)
    assert plain[0, 0] == pytest.approx(on) and plain[0, 1] == pytest.approx(off)


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path):
    t = trainer(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "2", "--run-name", "nan")
    last = tmp_path / "ck" / "nan" / "last.safetensors"
    real = t.step_parts.criterion
    snapshot = {}

    def nan_in_epoch_two(logits, target):
        if t.step >= 2:  # epoch 1 is saved by now
            snapshot.setdefault("bytes", last.read_bytes())
            return real(logits, target) * float("nan")
        return real(logits, target)

    t.step_parts = dataclasses.replace(t.step_parts, criterion=nan_in_epoch_two)
    with pytest.raises(NonFiniteLoss, match="loss became nan in epoch 2"):
        t.fit()
    assert last.read_bytes() == snapshot["bytes"]
    assert load_state(tmp_path / "ck" / "nan" / "last.state.pt")["epoch"] == 1


@pytest.mark.slow(5)
def test_evaluating_every_other_epoch_trains_the_same_and_resumes(tmp_path):
    common = ["--epochs", "3", "--max-steps-per-epoch", "3", "--deterministic"]
    trainer(tmp_path, *common, "--run-name", "each").fit()
    cut = trainer(tmp_path, *common, "--run-name", "some", "--eval-every", "2", "--figures")
    interrupt_at(cut, 5)  # in epoch 2, after the unevaluated epoch 1
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    result = trainer(tmp_path, "--resume", "some", "--checkpoint-dir", str(tmp_path / "ck")).fit()
    x, y = (_weights(tmp_path / "ck" / run / "last.safetensors") for run in ("each", "some"))
    assert all(torch.equal(x[k], y[k]) for k in x), "evaluating less often never changes the training"
    rows = result["history"]
    assert [r["test_acc"] is not None for r in rows] == [False, True, True], rows  # epoch 2, and the last
    assert result["final"].accuracy == rows[-1]["test_acc"] and result["best_epoch"] in (2, 3)
    with open(tmp_path / "runs" / "some" / "metrics.csv") as f:
        assert [line.split(",")[5] for line in f.read().splitlines()[1:]][0] == "", "an empty test_acc in epoch 1's row"
    assert (tmp_path / "fig" / "some" / "training_curves.png").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "resnet9"], "unknown --model 'resnet9'"),
        (["--eval-every", "-1"], "--eval-every must be >= 0"),
        (["--optimizer", "lamb"], "unknown --optimizer 'lamb'"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--batch-size", "20000"], "lower --batch-size"),
        (["--amp", "fp8"], "unknown --amp"),
        (["--config", "configs/nope.yaml"], "not found"),
        (["--device", "gpu"], "--device 'gpu' is not a device; use auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_settings_fail_with_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        main_train(run_args(tmp_path, "--epochs", "1", *flags))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_resume_with_another_model_fails(tmp_path, capsys):
    trainer(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "1", "--run-name", "r18").fit()
    with pytest.raises(SystemExit):
        main_train(run_args(tmp_path, "--resume", "r18", "--model", "resnext29_32x4d"))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model 'resnext29_32x4d' differs from 'preactresnet18'") and "\n" not in err


def test_config_yaml_then_flags(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 0.2\nepochs: 3\noptimizer: sgd\n")
    cfg, explicit = parse_args(["--config", str(path), "--epochs", "5"])
    assert (cfg.lr, cfg.epochs, cfg.optimizer, cfg.batch_size) == (0.2, 5, "sgd", 256)
    path.write_text("learning_rate: 0.2\n")
    with pytest.raises(ValueError, match="unknown setting.*learning_rate"):
        parse_args(["--config", str(path)])


def test_spec_defaults():
    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.optimizer, cfg.label_smoothing) == (256, 200, 0.05, "adagrad", 0.1)


DENORMALS = """
import sys, torch
from preactresnet.config import parse_args
from preactresnet.training import Trainer
cfg, explicit = parse_args(sys.argv[1:])
Trainer.from_config(cfg, explicit, out=lambda *a: None).train_steps(1)
x = torch.full((1 << 22,), 1e-39)  # a denormal float32; the multiply is split over the threads
print((x * 1.0).count_nonzero().item())
"""


@pytest.mark.slow(8)
@pytest.mark.parametrize("flush", [True, False])
def test_a_run_flushes_denormals_in_every_thread(tmp_path, flush):
    """Late in training denormals made a step 3x slower (BENCHMARKS.md): every thread of the run counts them as zero."""
    argv = run_args(tmp_path, "--threads", "2", "--epochs", "1", "--max-steps-per-epoch", "2", "--compile", "off",
                    *([] if flush else ["--no-flush-denormal"]))
    done = subprocess.run([sys.executable, "-c", DENORMALS, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == (0 if flush else 1 << 22)
