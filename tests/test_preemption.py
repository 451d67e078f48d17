"""What clusters do to jobs (SIGTERM, another number of processes, another device) and the corners a
review found in saving, metadata, precision and evaluation. The torchrun SIGTERM test is in
test_distributed.py."""

import csv
import json
import os
import signal

import pytest
import torch

import preactresnet.training as training
from preactresnet import fileio
from preactresnet.checkpoint import load_state, read_metadata, save_state
from preactresnet.cli import main_train
from preactresnet.config import TrainConfig, parse_args
from preactresnet.training.resolve import resolve_config
from preactresnet.distributed import DistInfo
from preactresnet.hub import export
from preactresnet.inference import tta_views
from preactresnet.optim import build_optimizer
from preactresnet.models import create_model
from preactresnet.profile import load_profile, write_profile
from preactresnet.reporting import collect_checkpoints
from preactresnet.system import apply_process_settings, resolve_amp
from preactresnet.training import Stopped

from conftest import write_tree
from test_training import _weights, interrupt_at, run_args, trainer

SHORT = ["--epochs", "1", "--max-steps-per-epoch", "5", "--deterministic"]


def _csv(tmp_path, run):
    with open(tmp_path / "runs" / run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_sigterm_saves_mid_epoch_and_resumes_exactly(tmp_path):
    trainer(tmp_path, *SHORT, "--run-name", "straight").fit()
    t = trainer(tmp_path, *SHORT, "--run-name", "cut")
    interrupt_at(t, 2, sig=signal.SIGTERM, times=2)  # srun and torchrun may both deliver it: the second is ignored
    with pytest.raises(Stopped) as stopped:
        t.fit()
    assert stopped.value.code == 128 + signal.SIGTERM
    state = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    assert state["step"] == 2 and state["ranks"][0]["loader"]["batch"] == 2
    trainer(tmp_path, "--resume", str(tmp_path / "ck" / "cut")).fit()
    x, y = _weights(tmp_path / "ck" / "straight" / "last.safetensors"), _weights(tmp_path / "ck" / "cut" / "last.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    # The epoch's loss and images/s count the steps before the stop too.
    a, b = _csv(tmp_path, "straight")[0], _csv(tmp_path, "cut")[0]
    assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), abs=2e-6)


def _straight_and_cut(tmp_path, flags: list, stop_at: int) -> dict:
    """Train `flags` unbroken ("straight") and Ctrl-C'd after step `stop_at` ("cut"), then resume "cut" to its end;
    returns the state "cut" saved at the stop."""
    trainer(tmp_path, *flags, "--run-name", "straight").fit()
    t = trainer(tmp_path, *flags, "--run-name", "cut")
    interrupt_at(t, stop_at)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    saved = load_state(tmp_path / "ck" / "cut" / "last.state.pt")
    trainer(tmp_path, "--resume", str(tmp_path / "ck" / "cut")).fit()
    return saved


def test_stop_on_the_last_step_of_an_epoch_keeps_its_loss(tmp_path):
    assert _straight_and_cut(tmp_path, SHORT, 5)["ranks"][0]["loader"]["batch"] == 5
    a, b = _csv(tmp_path, "straight")[0], _csv(tmp_path, "cut")[0]
    assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), abs=2e-6) and float(b["train_loss"]) > 0
    assert float(b["images_per_sec"]) > 0 and float(b["epoch_seconds"]) > 0


def test_a_stop_on_the_plans_last_step_mid_epoch_resumes_without_an_extra_step(tmp_path):
    """A plan that ends inside an epoch (most time budgets), stopped on its last step: the resume only evaluates."""
    assert _straight_and_cut(tmp_path, [*SHORT, "--total-steps", "3"], 3)["ranks"][0]["loader"]["batch"] == 3
    assert load_state(tmp_path / "ck" / "cut" / "last.state.pt")["step"] == 3
    x, y = _weights(tmp_path / "ck" / "straight" / "last.safetensors"), _weights(tmp_path / "ck" / "cut" / "last.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_train_py_exits_143_after_a_sigterm_save(monkeypatch, capsys):
    def preempted(*args, **kwargs):
        raise Stopped("stopped: saved", 128 + signal.SIGTERM)

    monkeypatch.setattr("preactresnet.cli.train", preempted)
    with pytest.raises(SystemExit) as done:
        main_train(["--data-dir", "sample"])
    assert done.value.code == 143


def _saved_state(tmp_path, at="mid", extra=(), **changes):
    """A real state saved by a stop mid-epoch (after step 2 of 3) or at the end of epoch 1 (the signal came
    while epoch 1 was being checkpointed), then edited as another machine would have saved it."""
    t = trainer(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "3", "--run-name", "saved", *extra)
    if at == "mid":
        interrupt_at(t, 2)
    else:
        checkpoint = t.checkpointer.save_epoch
        t.checkpointer.save_epoch = lambda *a: os.kill(os.getpid(), signal.SIGINT) or checkpoint(*a)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    path = tmp_path / "ck" / "saved" / "last.state.pt"
    state = load_state(path)
    assert state["ranks"][0]["loader"]["batch"] == (2 if at == "mid" else 0)
    state.update(changes)
    save_state(path, state)
    return path.parent


def _resolve(run_dir, *extra, dist=DistInfo()):
    cfg, explicit = parse_args(["--resume", str(run_dir), *extra])
    return resolve_config(cfg, explicit, dist, warn=lambda *a: None)


def test_resume_on_another_number_of_processes_is_refused_in_one_line(tmp_path):
    run_dir = _saved_state(tmp_path)
    state = load_state(run_dir / "last.state.pt")
    state.update(world_size=2, ranks=state["ranks"] * 2)
    save_state(run_dir / "last.state.pt", state)
    with pytest.raises(ValueError, match=r"saved by 2 process\(es\) and this run has 1.*torchrun --nproc_per_node=2") as err:
        _resolve(run_dir)
    assert "\n" not in str(err.value)


def test_resume_on_another_device_type(tmp_path):
    mid = _saved_state(tmp_path, device_type="cuda")
    with pytest.raises(ValueError, match="saved mid-epoch on cuda.*--device cuda"):
        _resolve(mid)
    # At the end of an epoch the augmentation stream starts afresh: a CUDA generator state is not read.
    end = _saved_state(tmp_path / "end", at="end", device_type="cuda")
    state = load_state(end / "last.state.pt")
    state["ranks"][0]["loader"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a Philox state, as CUDA saves
    save_state(end / "last.state.pt", state)
    result = trainer(tmp_path / "end", "--resume", str(end)).fit()
    assert result["history"][-1]["epoch"] == 2


def test_resume_on_another_device_type_builds_this_devices_optimizer(tmp_path):
    """A GPU run's optimizer was built fused; resumed on a CPU, the loaded state must not carry that over."""
    run_dir = _saved_state(tmp_path, at="end", extra=("--optimizer", "sgd", "--lr", "0.1"))
    state = load_state(run_dir / "last.state.pt")
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=True, foreach=None)  # what build_optimizer gives on CUDA
    save_state(run_dir / "last.state.pt", state)
    resumed = trainer(tmp_path, "--resume", str(run_dir))
    built = trainer(tmp_path / "fresh", "--optimizer", "sgd", "--lr", "0.1")
    assert [g.get("fused") for g in resumed.step_parts.optimizer.param_groups] == [g.get("fused") for g in built.step_parts.optimizer.param_groups]
    assert not any(g.get("fused") for g in resumed.step_parts.optimizer.param_groups)


def test_resumed_run_keeps_the_precision_it_began_with(tmp_path):
    here = resolve_amp("auto", torch.device("cpu"))
    other = "off" if here is not None else "bf16"
    run_dir = _saved_state(tmp_path, extra=("--amp", "auto"), precision=other)
    assert _resolve(run_dir).cfg.amp == other
    fp16 = _saved_state(tmp_path / "fp16", extra=("--amp", "auto"), precision="fp16")
    with pytest.raises(ValueError, match="fp16, which needs a CUDA GPU"):
        _resolve(fp16)


def test_odd_batch_trains_without_mixing(tmp_path):
    # Width 0.25: at 0.125, torch 2.14's CPU backward of the 8-channel 1x1 stride-2 conv in channels_last
    # crashes on any odd batch (a PyTorch defect, reproduced without this package).
    result = trainer(tmp_path, "--batch-size", "33", "--mix-prob", "0", "--epochs", "1", "--max-steps-per-epoch", "3",
                     "--width-mult", "0.25").fit()
    assert result["history"][0]["step"] == 3
    with pytest.raises(ValueError, match="--batch-size must be even when MixUp/CutMix is on"):
        trainer(tmp_path, "--batch-size", "33", "--mix-prob", "0.5")


def test_atomic_write_fsyncs_file_and_folder_and_cleans_leftovers(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    leftover = fileio.temp_name(tmp_path / "last.safetensors", pid=2**22 + 12345)  # a killed writer's
    leftover.write_bytes(b"half")
    # On a shared folder another machine's process ids mean nothing here: its temporary may be a live write.
    other_host = tmp_path / f".last.tmp.another-node-{2**22 + 12345}.safetensors"
    other_host.write_bytes(b"being written on another node")
    fileio.atomic_write(tmp_path / "last.safetensors", lambda tmp: tmp.write_bytes(b"whole"))
    assert other_host.exists(), "another machine's temporary was removed"
    kinds = [(kind, os.path.basename(path)) for kind, path in events]
    assert kinds[0][0] == "fsync" and kinds[0][1].startswith(".last.tmp.")  # the data, before the rename
    assert kinds[1] == ("replace", "last.safetensors")
    assert kinds[2] == ("fsync", tmp_path.name)  # the folder entry
    assert not leftover.exists() and (tmp_path / "last.safetensors").read_bytes() == b"whole"


def test_leftover_temporaries_are_never_listed_as_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fileio.temp_name(run / "last.safetensors", pid=4242).write_bytes(b"half a file")
    with pytest.raises(Exception, match=f"no .safetensors checkpoints found in {run}"):
        collect_checkpoints([str(run)], "checkpoints")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match=f"found in {empty}/"):
        collect_checkpoints([], str(empty))


def test_best_then_state_then_last(tmp_path, monkeypatch):
    """The order that a kill cannot turn into a best.safetensors older than the state naming it (test below)."""
    written = []
    import preactresnet.training.state as state  # where the save rules live

    for name in ("save_state", "save_weights"):
        real = getattr(state, name)
        monkeypatch.setattr(state, name, lambda path, *a, _real=real, **k: written.append(path.name) or _real(path, *a, **k))
    trainer(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2", "--ema").fit()
    assert written == ["best.safetensors", "last.state.pt", "last.safetensors", "ema.safetensors"]


def test_metadata_ema_accuracy_selection_and_no_absolute_paths(tmp_path, small_real):
    tx, ty, vx, vy, classes = small_real
    data = tmp_path / "elsewhere" / "cifar-tree"
    write_tree(data, tx, ty, classes, "train")
    write_tree(data, vx, vy, classes, "test")
    cfg, explicit = parse_args(run_args(tmp_path, "--data-dir", str(data), "--batch-size", "8", "--epochs", "1",
                                        "--max-steps-per-epoch", "2", "--ema", "--ema-decay", "0.5", "--run-name", "m"))
    t = training.Trainer.from_config(cfg, explicit, out=lambda *a: None, command=f"python train.py --data-dir {data}")
    row = t.fit()["history"][-1]
    run = tmp_path / "ck" / "m"
    ema, best = read_metadata(run / "ema.safetensors"), read_metadata(run / "best.safetensors")
    assert ema["ema"] and ema["test_accuracy"] == round(row["ema_test_acc"], 4)
    assert read_metadata(run / "last.safetensors")["test_accuracy"] == round(row["test_acc"], 4)
    assert best["selected_on"] == "test"
    for meta in (ema, best):
        assert str(tmp_path) not in json.dumps(meta), "no absolute path of the training machine"
        assert "cifar-tree" in meta["data_description"] and meta["data_dir"] == ""
    card = (export(run / "best.safetensors", tmp_path / "pretrained") / "README.md").read_text()
    assert "chosen on the TEST set" in card and str(tmp_path) not in card


def test_best_on_validation_is_recorded(tmp_path):
    trainer(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2", "--val-size", "500", "--run-name", "v").fit()
    meta = read_metadata(tmp_path / "ck" / "v" / "best.safetensors")
    assert meta["selected_on"] == "validation" and "val_accuracy" in meta


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_on_cuda_uses_bf16_only_where_native(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what V100/T4 report (emulated)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert resolve_amp("auto", torch.device("cuda")) is expected


def test_flip_translate_tta_pads_with_black():
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1).expand(2, 3, 8, 8).clone()
    for view in tta_views(black, "flip-translate", mean, std):  # shifting a black image leaves it black
        assert torch.allclose(view, black)
    x = torch.randn(1, 3, 8, 8)
    shifted = tta_views(x, "flip-translate", mean, std)[2]  # moved down by 2 px: its top rows are padding
    assert torch.allclose(shifted[:, :, :2], black[:1, :, :2]) and torch.equal(shifted[:, :, 2:], x[:, :, :-2])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adagrad"])
def test_no_weight_decay_on_batchnorm_and_biases(optimizer):
    model = create_model("preactresnet18", width_mult=0.125)
    opt = build_optimizer(TrainConfig(optimizer=optimizer, weight_decay=5e-4), model)
    no_decay = {id(p) for n, p in model.named_parameters() if p.ndim <= 1}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["weight_decay"] == (0.0 if ids <= no_decay else 5e-4)
        assert ids <= no_decay or not ids & no_decay
    assert sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] == 0.0) == len(no_decay)


def test_profile_process_settings_applied_and_kept_on_resume(tmp_path, monkeypatch):
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert apply_process_settings({"tf32": False, "cudnn_benchmark": True}, deterministic=False)["cudnn_benchmark"]
        assert torch.backends.cudnn.benchmark is True
        # No profile: nothing recorded, so a resume keeps the defaults (set_deterministic's benchmark choice).
        assert apply_process_settings({}, deterministic=False) == {} and torch.backends.cudnn.benchmark is True
        torch.backends.cuda.matmul.allow_tf32 = False
        run_dir = _saved_state(tmp_path, process={"tf32": True, "cudnn_benchmark": False})
        t = trainer(tmp_path, "--resume", str(run_dir))
        assert torch.backends.cuda.matmul.allow_tf32 is True and t.startup.process["tf32"] is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_a_profile_timed_on_another_width_is_reported(tmp_path):
    rows = [{"amp": "fp32", "channels_last": "on", "threads": 2, "compile": False, "images_per_sec": 10.0}]
    path = tmp_path / "p.json"
    write_profile(path, torch.device("cpu"), "preactresnet18", 32, rows, width_mult=0.25)
    said = []
    assert load_profile(str(path), "preactresnet18", torch.device("cpu"), warn=said.append, shape=(1.0, 256)) is not None
    assert "timed on preactresnet18 width x0.25 at batch 32, this run is x1.0 at batch 256" in said[0]
    said.clear()
    load_profile(str(path), "preactresnet18", torch.device("cpu"), warn=said.append, shape=(0.25, 32))
    assert not said


def test_a_resume_finds_a_moved_run_and_refuses_other_data(tmp_path, small_real, capsys):
    """--data-dir may point to the same data elsewhere, not to another training set; --checkpoint-dir to where the run moved."""
    tx, ty, vx, vy, classes = small_real
    data = tmp_path / "tree"
    write_tree(data, tx, ty, classes, "train")
    write_tree(data, vx, vy, classes, "test")
    t = trainer(tmp_path, "--data-dir", str(data), "--batch-size", "8", "--epochs", "2", "--run-name", "m")  # 5 steps an epoch
    interrupt_at(t, 3)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    capsys.readouterr()
    (tmp_path / "moved").mkdir()
    (tmp_path / "ck" / "m").rename(tmp_path / "moved" / "m")
    with pytest.raises(SystemExit):  # the bundled sample: the same ten classes, many more training images
        main_train(run_args(tmp_path, "--resume", "m", "--checkpoint-dir", str(tmp_path / "moved"), "--batch-size", "8"))
    err = capsys.readouterr().err.strip()
    assert "5 steps an epoch" in err and "resume with the --data-dir it was trained on" in err and "\n" not in err
    data.rename(tmp_path / "tree2")
    result = trainer(tmp_path, "--resume", "m", "--checkpoint-dir", str(tmp_path / "moved"), "--data-dir", str(tmp_path / "tree2"),
                     "--batch-size", "8").fit()
    assert result["history"][-1]["step"] == 10


def test_a_fresh_run_never_replaces_an_unfinished_one(tmp_path):
    """A second `make demo` (any fixed --run-name) replaced checkpoints/<run>/ whole, a Ctrl-C'd run's last.state.pt included."""
    run_dir = _saved_state(tmp_path)  # stopped at step 2 of 6 by a Ctrl-C
    before = (run_dir / "last.state.pt").read_bytes()
    cfg, explicit = parse_args(run_args(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "3", "--run-name", "saved"))
    with pytest.raises(ValueError, match=r"holds an unfinished run \(stopped at step 2, epoch 1\): continue it with --resume") as err:
        resolve_config(cfg, explicit, DistInfo(), warn=lambda *a: None)
    assert "\n" not in str(err.value) and (run_dir / "last.state.pt").read_bytes() == before
    _resolve(run_dir).cfg  # the way it names still resumes
    trainer(tmp_path, "--resume", str(run_dir)).fit()  # finished now: the same command starts afresh over it
    assert resolve_config(cfg, explicit, DistInfo(), warn=lambda *a: None).cfg.run_name == "saved"


def _killed_at_write(tmp_path, monkeypatch, flags: list, killed_write: int) -> list:
    """Train `flags` unbroken ("straight"), then as "cut" hard-killed at the `killed_write`-th file that epoch 2's save
    writes, then --resume "cut" to its end; the resumed run's lines. Each evaluation scores better than the last."""
    import preactresnet.training.state as state_module

    judge, scores = state_module.Checkpointer.judge, iter(range(1, 100))
    monkeypatch.setattr(state_module.Checkpointer, "judge", lambda self, ev: (float(next(scores)), *judge(self, ev)[1:]))
    trainer(tmp_path, *flags, "--run-name", "straight").fit()
    epoch, writes = [0], []

    def killing(write):
        def wrapped(path, *args):
            if epoch[0] == 2:
                writes.append(path)
            if len(writes) == killed_write:
                raise SystemError("killed")  # as SIGKILL: no handler runs, what was written stays
            return write(path, *args)
        return wrapped

    save_epoch = state_module.Checkpointer.save_epoch
    with monkeypatch.context() as m:
        m.setattr(state_module.Checkpointer, "save_epoch", lambda self, e, *a: epoch.__setitem__(0, e) or save_epoch(self, e, *a))
        m.setattr(state_module, "save_state", killing(state_module.save_state))
        m.setattr(state_module, "save_weights", killing(state_module.save_weights))
        with pytest.raises(SystemError):
            trainer(tmp_path, *flags, "--run-name", "cut").fit()
    lines = []
    training.Trainer.from_config(*parse_args(run_args(tmp_path, "--resume", str(tmp_path / "ck" / "cut"))),
                                 out=lambda *a: lines.append(" ".join(map(str, a)))).fit()
    return lines


KILL_FLAGS = ["--epochs", "2", "--max-steps-per-epoch", "3", "--eval-every", "1", "--deterministic"]


@pytest.mark.parametrize("killed_write", [1, 2, 3])
def test_a_kill_while_saving_never_leaves_best_behind_the_state(tmp_path, monkeypatch, killed_write):
    """A hard kill at the 1st, 2nd or 3rd file epoch 2 writes (best, state, last), then --resume to the end:
    best.safetensors holds the epoch the state names as best, with that epoch's weights."""
    _killed_at_write(tmp_path, monkeypatch, [*KILL_FLAGS, "--no-ema"], killed_write)
    run = tmp_path / "ck" / "cut"
    assert read_metadata(run / "best.safetensors")["epoch"] == load_state(run / "last.state.pt")["best_epoch"] == 2
    x, y = _weights(tmp_path / "ck" / "straight" / "best.safetensors"), _weights(run / "best.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("killed_write", [3, 4])
def test_a_kill_after_the_state_leaves_no_weights_behind_it(tmp_path, monkeypatch, killed_write):
    """A hard kill at epoch 2's last or EMA weights, after its state landed: the resume (of a finished run: it trains
    nothing) writes them again from the state, as an unbroken run left them, and says so."""
    lines = _killed_at_write(tmp_path, monkeypatch, [*KILL_FLAGS, "--ema"], killed_write)
    assert sum("written again from the state" in line for line in lines) == 1
    for name in ("last.safetensors", "ema.safetensors"):
        straight, cut = tmp_path / "ck" / "straight" / name, tmp_path / "ck" / "cut" / name
        assert read_metadata(cut)["epoch"] == read_metadata(straight)["epoch"] == 2
        assert read_metadata(cut)["training"]["steps"] == read_metadata(straight)["training"]["steps"]
        x, y = _weights(straight), _weights(cut)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_resume_writes_no_weights_that_are_in_step_and_mends_a_budgets_with_its_plan(tmp_path):
    """Nothing behind: a finished run's resume leaves its weights as they were and says nothing of them. A time
    budget's last weights, deleted: written again with the plan its state holds (epochs and steps) and its save's date."""
    t = trainer(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "3", "--run-name", "done")
    t.fit()
    run = tmp_path / "ck" / "done"
    before = (run / "last.safetensors").read_bytes()
    lines = []
    training.Trainer.from_config(*parse_args(run_args(tmp_path, "--resume", str(run))), out=lambda *a: lines.append(str(a))).fit()
    assert (run / "last.safetensors").read_bytes() == before and not any("written again" in line for line in lines)
    state = {**load_state(run / "last.state.pt"), "budget": {"seconds": 60.0}}  # as a --time-budget run saves it
    state["date"] = "2026-01-02"  # saved on an earlier day than the resume's: the weights are that day's
    (run / "last.safetensors").unlink()
    t.checkpointer.mend_last_weights(state)
    assert read_metadata(run / "last.safetensors")["plan"] == {"epochs": 2, "total_steps": 6}
    assert read_metadata(run / "last.safetensors")["training"]["date"] == "2026-01-02"
    assert t.checkpointer.mended.startswith("; last.safetensors written again")
