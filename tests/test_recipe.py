"""The time-to-accuracy techniques: alternating flip, whitened stem, linear decay, BN/bias lr, Muon, EMA, Lookahead, TTA."""

from __future__ import annotations

import csv
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.optim import Muon
from test_training import interrupt_at, run_args, trainer

from preactresnet.checkpoint import load_state, read_metadata
from preactresnet.config import TrainConfig, build_parser
from preactresnet.data import AugmentConfig, BatchAugment, TensorLoader
from preactresnet.models import create_model, list_models
from preactresnet.optim import Lookahead, build_ema, build_lookahead, build_optimizer, build_scheduler
from preactresnet.plan import RunPlan
from preactresnet.whitening import patch_whitening, stem_conv, whiten_stem_

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _flip_only_loader(images, alternate: bool, seed: int = 0) -> TensorLoader:
    aug = BatchAugment(AugmentConfig(crop_padding=0, jitter_prob=0, erase_prob=0), (0.5,) * 3, (0.25,) * 3)
    labels = torch.arange(len(images))  # the label names the image, so batches can be matched across epochs
    return TensorLoader(images, labels, 8, train=True, transform=aug, seed=seed, alternate_flip=alternate)


def _by_image(loader: TensorLoader, epoch: int) -> dict[int, torch.Tensor]:
    loader.set_epoch(epoch)
    return {int(i): x for xb, yb in loader for i, x in zip(yb, xb)}


def test_alternating_flip_mirrors_every_image_on_alternate_epochs(sample_dataset):
    images = sample_dataset.train_images[:64]
    loader = _flip_only_loader(images, alternate=True)
    e0, e1, e2 = (_by_image(loader, e) for e in range(3))
    assert e0.keys() == e1.keys() == e2.keys()
    for i in e0:
        assert torch.equal(e1[i], e0[i].flip(-1)), "epoch 1 shows the mirror of epoch 0"
        assert torch.equal(e2[i], e0[i]), "epoch 2 shows epoch 0 again"
    flipped = sum(not torch.equal(e0[i], _flip_only_loader(images, False).transform.normalize(images[i : i + 1])[0]) for i in e0)
    assert 16 <= flipped <= 48, "the first epoch flips about half of the images (a seeded coin each)"
    again = _by_image(_flip_only_loader(images, alternate=True), 0)
    assert all(torch.equal(again[i], e0[i]) for i in e0), "the coins are a pure function of the seed"


def test_patch_whitening_decorrelates_patches(sample_dataset):
    x = sample_dataset.train_images[:500].float().div(255)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    filters = patch_whitening(x, (3, 3), eps=1e-6)
    assert filters.shape == (54, 3, 3, 3)
    assert torch.allclose(filters[27:], -filters[:27])
    out = F.conv2d(x, filters[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    cov = out @ out.T / out.shape[1]
    assert torch.allclose(cov, torch.eye(12), atol=0.05), "the top directions come out with unit variance, uncorrelated"


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_has_a_stem_to_whiten(name, sample_dataset):
    model = create_model(name, width_mult=0.125)
    stem = stem_conv(model)
    before = stem.weight.detach().clone()
    n = whiten_stem_(model, sample_dataset.train_images[:200], sample_dataset.mean, sample_dataset.std)
    assert n == min(stem.out_channels // 2, 27) * 2
    assert not torch.equal(stem.weight[:n], before[:n]) and torch.equal(stem.weight[n:], before[n:])


def test_linear_schedule_and_bn_lr_scale():
    cfg = TrainConfig(optimizer="sgd", lr=0.4, min_lr=0.0, warmup_epochs=1, warmup_max_fraction=0.5, warmup_lr=0.0, epochs=3,
                      schedule="linear", bn_lr_scale=4.0, weight_decay=5e-4)
    model = create_model("preactresnet18", width_mult=0.125)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, RunPlan.of(cfg, 10))
    weights, others = opt.param_groups[0], opt.param_groups[-1]
    assert weights["weight_decay"] == 5e-4 and others["weight_decay"] == 0.0, "no weight decay on BN and biases"
    bn_and_bias = {id(p) for n, p in model.named_parameters() if p.ndim <= 1}
    assert {id(p) for p in others["params"]} == bn_and_bias
    lrs = []
    for step in range(31):
        sched.step_update(num_updates=step)
        lrs.append((weights["lr"], others["lr"]))
    assert lrs[10][0] == pytest.approx(0.4) and lrs[20][0] == pytest.approx(0.2) and lrs[30][0] == pytest.approx(0.0)
    assert all(b == pytest.approx(4 * a) for a, b in lrs), "BN/bias groups follow the schedule, 4x"


def test_muon_trains_conv_weights_and_falls_back_for_the_rest(sample_dataset):
    cfg = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.0)
    model = create_model("preactresnet18", width_mult=0.125)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, Muon) and opt.ns_dtype == torch.bfloat16, "a config not yet timed keeps timm's bf16"
    head = [g for g in opt.param_groups if g.get("use_fallback")]
    assert head and {id(p) for p in head[0]["params"]} == {id(model.head.fc.weight)}
    x = sample_dataset.train_images[:64].float().div(255)
    y = sample_dataset.train_labels[:64]
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_head_lr_scale_follows_the_schedule_under_muon_and_sgd():
    for optimizer in ("muon", "sgd"):
        cfg = TrainConfig(optimizer=optimizer, lr=0.02, warmup_epochs=0, epochs=2, head_lr_scale=0.1)
        model = create_model("preactresnet18", width_mult=0.125)
        opt = build_optimizer(cfg, model)
        sched = build_scheduler(cfg, opt, RunPlan.of(cfg, 10))
        head = next(g for g in opt.param_groups if any(p is model.head.fc.weight for p in g["params"]))
        assert len(head["params"]) == 1 and bool(head.get("use_fallback")) == (optimizer == "muon")
        for step in (0, 7):
            sched.step_update(num_updates=step)
            assert head["lr"] == pytest.approx(0.1 * opt.param_groups[0]["lr"]) and head["lr"] > 0
    plain = build_optimizer(TrainConfig(optimizer="sgd"), create_model("preactresnet18", width_mult=0.125))
    assert len(plain.param_groups) == 2, "at scale 1 the classifier stays with the weights: older checkpoints' groups"


def test_adamuon_steps_through_the_chosen_orthogonalization(sample_dataset):
    cfg = TrainConfig(optimizer="muon", lr=0.02, muon_algo="adamuon", muon_ns_dtype="fp32")
    model = create_model("preactresnet18", width_mult=0.125)
    if "algo" not in inspect.signature(Muon).parameters:  # timm 1.0.21 (make test-oldest): a one-line refusal
        with pytest.raises(ValueError, match="--muon-algo adamuon needs a newer timm"):
            build_optimizer(cfg, model)
        return
    opt = build_optimizer(cfg, model)
    x, y = sample_dataset.train_images[:32].float().div(255), sample_dataset.train_labels[:32]
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert "exp_avg_sq" in opt.state[conv], "AdaMuon keeps a second moment for each conv weight"
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("preset", ["original", "polar_express"])
def test_muon_orthogonalizes_with_the_chosen_preset(monkeypatch, preset):
    """--muon-ns-coefficients hands timm's preset to the orthogonalization, in the precision chosen."""
    import timm.optim.muon as timm_muon
    import preactresnet.optim as optim

    seen, real = [], optim.newton_schulz
    monkeypatch.setattr(optim, "newton_schulz", lambda G, steps, co, *a, **k: seen.append((co, k["dtype"])) or real(G, steps, co, *a, **k))
    model = create_model("preactresnet18", width_mult=0.125)
    opt = build_optimizer(TrainConfig(optimizer="muon", muon_ns_coefficients=preset, muon_ns_dtype="fp32"), model)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.step()
    wanted = timm_muon.resolve_ns_coefficients(preset, timm_muon._COEFFICIENTS)
    assert len(seen) == sum(p.ndim == 4 for p in model.parameters()) and all(s == (wanted, torch.float32) for s in seen)


def test_an_algo_this_timm_lacks_is_refused_before_start_up(tmp_path, capsys, monkeypatch):
    from preactresnet import optim
    from preactresnet.cli import main_train

    class OldMuon:  # timm 1.0.21's Muon: no `algo`
        def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95):
            pass
    monkeypatch.setattr(optim, "Muon", OldMuon)
    timed = []  # precision's timings are start-up's first (a second or more on a CPU with --amp auto)
    monkeypatch.setattr("preactresnet.training.loop.resolve_precision", lambda run, *a, **k: timed.append(1) or run)
    with pytest.raises(SystemExit) as exc:
        main_train(run_args(tmp_path, "--optimizer", "muon", "--muon-algo", "adamuon", "--run-name", "old"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--muon-algo adamuon needs a newer timm" in err, err
    assert not timed and not (tmp_path / "ck").exists(), "nothing timed, nothing written"


def test_muon_fixed_norm_holds_each_weight_on_its_first_norm_across_a_resume(sample_dataset):
    cfg = TrainConfig(optimizer="muon", lr=0.05, weight_decay=0.5, muon_fixed_norm=True, muon_ns_dtype="fp32")
    model = create_model("preactresnet18", width_mult=0.125)
    first = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    opt = build_optimizer(cfg, model)
    x, y = sample_dataset.train_images[:32].float().div(255), sample_dataset.train_labels[:32]

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    steps(3)
    conv = model.stem.weight
    moved = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        if param.ndim == 4:  # Muon's: back on their first norm, though decay 0.5 x lr 0.05 would shrink them 7% in 3 steps
            assert moved[name] == pytest.approx(first[name], rel=1e-4), name
    assert moved["head.fc.weight"] != pytest.approx(first["head.fc.weight"], rel=1e-3), "AdamW's classifier moves freely"
    saved = opt.state_dict()
    opt = build_optimizer(cfg, model)
    opt.load_state_dict(saved)
    with torch.no_grad():
        conv.mul_(2)  # were the norm taken afresh on resume, the doubled one would stay
    steps(1)
    assert conv.norm().item() == pytest.approx(first["stem.weight"], rel=1e-4)


def test_frozen_stem_keeps_its_whitening_while_the_rest_trains(tmp_path):
    t = trainer(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "3", "--whiten-stem", "--freeze", "stem", "--optimizer", "muon",
                "--lr", "0.02", "--run-name", "f")
    start = {n: p.detach().clone() for n, p in t.net.model.named_parameters()}
    assert all(p is not t.net.model.stem.weight for g in t.step_parts.optimizer.param_groups for p in g["params"])
    t.fit()
    after = dict(t.net.model.named_parameters())
    assert torch.equal(after["stem.weight"], start["stem.weight"]), "the whitening stays as measured"
    assert not torch.equal(after["stages.0.0.conv1.weight"], start["stages.0.0.conv1.weight"])
    assert torch.equal(load_file(tmp_path / "ck" / "f" / "last.safetensors")["stem.weight"], start["stem.weight"])
    t = trainer(tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2", "--freeze", "bn-scale,stem", "--run-name", "b")
    t.fit()
    frozen = {n for n, p in t.net.model.named_parameters() if not p.requires_grad}
    assert frozen == {"stem.weight"} | {n for n in start if n.endswith(".weight") and start[n].ndim == 1}
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in t.net.model.named_parameters() if n in frozen - {"stem.weight"})


def test_ema_warmup_starts_fast():
    model = torch.nn.Linear(2, 2)
    ema = build_ema(TrainConfig(ema=True, ema_decay=0.999, ema_warmup=True), model)
    assert ema.get_decay(10) < 0.9 < ema.get_decay(1000) <= 0.999
    assert build_ema(TrainConfig(ema=False), model) is None


def test_lookahead_steps_back_to_its_slow_copy_every_5_steps_and_ends_on_it():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    plan = RunPlan(steps_per_epoch=10, total_steps=12, warmup_steps=0)
    look, start = Lookahead(model, plan), {k: v.clone() for k, v in model.state_dict().items()}
    floats = [k for k, v in start.items() if v.is_floating_point()]  # weights, biases, BN statistics

    def step(n: int) -> None:  # optimizer step n moves every float tensor by +1, then Lookahead acts
        with torch.no_grad():
            for k in floats:
                model.state_dict()[k].add_(1.0)
        look.step(model, n)

    for n in range(1, 5):
        step(n)
    assert all(torch.allclose(model.state_dict()[k], start[k] + 4) for k in floats), "between syncs the network runs free"
    step(5)
    moved = 5 * (1 - 0.95 ** 5 * (5 / 12) ** 3)  # the slow copy moves 1 - decay of the way; the network goes back to it
    assert all(torch.allclose(model.state_dict()[k], start[k] + moved) for k in floats)
    for n in range(6, 13):  # step 10 syncs; 12 is the plan's last: no update, the network ends on the slow copy
        step(n)
    slow = look.state_dict()
    assert all(torch.equal(model.state_dict()[k], slow[k]) for k in floats)
    assert not torch.allclose(slow[floats[0]], start[floats[0]] + 12), "the last two steps are not in the slow copy"
    assert build_lookahead(TrainConfig(lookahead=False), model, plan) is None


@pytest.mark.slow(10)
def test_resume_is_exact_with_every_technique(tmp_path):
    common = ["--epochs", "2", "--max-steps-per-epoch", "3", "--deterministic", "--alt-flip", "--whiten-stem",
              "--ema", "--ema-warmup", "--schedule", "linear", "--bn-lr-scale", "2", "--optimizer", "muon",
              "--lr", "0.02", "--tta", "flip", "--lookahead", "--freeze", "stem"]  # Lookahead's sync at step 5 comes after the resume
    result = trainer(tmp_path, *common, "--run-name", "straight", "--figures").fit()  # the curves with an EMA
    assert result["tta_accuracy"] is not None and 0 <= result["tta_accuracy"] <= 100
    a = trainer(tmp_path, *common, "--run-name", "split")
    interrupt_at(a, 4)  # mid-epoch 2
    with pytest.raises(KeyboardInterrupt):
        a.fit()
    trainer(tmp_path, "--resume", str(tmp_path / "ck" / "split")).fit()
    for name in ("last.safetensors", "ema.safetensors"):
        x, y = load_file(tmp_path / "ck" / "straight" / name), load_file(tmp_path / "ck" / "split" / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    assert load_state(tmp_path / "ck" / "split" / "last.state.pt")["step"] == 6


def test_best_checkpoint_is_the_better_of_raw_and_ema_on_validation(tmp_path):
    t = trainer(tmp_path, "--epochs", "2", "--max-steps-per-epoch", "4", "--ema", "--ema-warmup", "--val-size", "500",
                "--run-name", "v", "--tta", "none", "--figures")  # the curves with validation and EMA lines
    t.fit()
    rows = t.log.history
    best = max(rows, key=lambda r: max(r["val_acc"], r["ema_val_acc"]))
    meta = read_metadata(tmp_path / "ck" / "v" / "best.safetensors")
    assert meta["val_accuracy"] == pytest.approx(max(best["val_acc"], best["ema_val_acc"]), abs=1e-3)
    assert meta["ema"] == (best["ema_val_acc"] > best["val_acc"])
    assert meta["test_accuracy"] == pytest.approx(best["ema_test_acc"] if meta["ema"] else best["test_acc"], abs=1e-3)


def test_every_train_setting_has_help_in_a_named_group():
    parser = build_parser()
    groups = {g.title: g for g in parser._action_groups}
    for title in ("model", "data", "augmentation", "mixing and loss", "optimization", "schedule",
                  "precision and speed", "output", "resume and reproducibility"):
        assert groups[title]._group_actions, title
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            assert action.help and not action.help.startswith("(default"), action.dest


def test_bad_technique_settings_are_one_line_errors(tmp_path, capsys):
    from preactresnet.cli import main_train

    for flags, message in ((["--schedule", "step"], "unknown --schedule 'step'"), (["--tta", "five"], "unknown --tta"),
                           (["--bn-lr-scale", "0"], "--bn-lr-scale must be > 0"),
                           (["--head-lr-scale", "-1"], "--head-lr-scale must be > 0"),
                           (["--muon-algo", "adam"], "--muon-algo must be muon or adamuon"),
                           (["--muon-adjust-lr", "kimi"], "--muon-adjust-lr must be match_rms_adamw or original"),
                           (["--muon-ns-coefficients", "cubic"], "--muon-ns-coefficients must be quintic, polar_express or original"),
                           (["--crop-fill", "edge"], "--crop-fill must be zero or reflect, got 'edge'"),
                           (["--freeze", "stem,head"], "--freeze takes stem and bn-scale, comma-separated; got 'stem,head'")):
        with pytest.raises(SystemExit) as exc:
            main_train(run_args(tmp_path, *flags))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.slow(6)
def test_recipe_ablation_writes_rows_and_a_table(tmp_path, capsys, monkeypatch):
    """bench/recipe.py's own main, each row's train.py command run by train.py's main in this process (a new
    interpreter per row would add seconds of imports; tests/test_demo.py runs train.py in its own)."""
    import contextlib
    import importlib.util
    import io
    import subprocess

    spec = importlib.util.spec_from_file_location("bench_recipe", ROOT / "bench" / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.chdir(ROOT)

    def run(cmd, **kwargs):
        from preactresnet.cli import main_train

        assert cmd[1] == str(ROOT / "train.py") and kwargs == {"capture_output": True, "text": True}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            main_train(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0, printed.getvalue(), "")

    monkeypatch.setattr(recipe.subprocess, "run", run)
    out = tmp_path / "r.jsonl"
    recipe.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--seeds", "0", "--rows", "recipe,+ema", "--out",
                 str(out), "--workdir", str(tmp_path / "w"), "--extra", "--epochs", "1", "--max-steps-per-epoch", "2",
                 "--amp", "off", "--muon-ns-dtype", "fp32", "--tta", "none"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["recipe", "+ema"] and all(0 <= r["test_acc"] <= 100 for r in rows)
    ema = list(csv.DictReader(open(tmp_path / "w" / "runs" / "+ema-s0" / "metrics.csv")))[-1]
    assert rows[1]["test_acc"] == float(ema["ema_test_acc"]), "the +ema row is scored by the EMA's accuracy"
    printed = capsys.readouterr().out
    assert "| recipe |" in printed and "| +ema |" in printed
