import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import preactresnet
from preactresnet.checkpoint import CheckpointError, read_metadata, save_state, save_weights
from preactresnet.cli import main_export, main_test
from preactresnet.hub import export, load_pretrained_into, model_card
from preactresnet.models import create_model

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"num_classes": 10, "width_mult": 0.125, "drop_rate": 0.0, "zero_init_residual": False}
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture()
def run_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = create_model("preactresnet18", **ARGS).eval()
    path = tmp_path / "checkpoints" / "demo" / "best.safetensors"
    meta = {"model": "preactresnet18", "model_args": ARGS, "classes": CLASSES, "mean": [0.49, 0.48, 0.45],
            "std": [0.245, 0.243, 0.261], "dataset": "cifar10", "data_dir": "sample", "run": "demo", "epoch": 4,
            "test_accuracy": 54.1, "command": "python train.py --config configs/demo.yaml",
            "training": {"steps": 1564, "epochs": 4, "minutes": 1.2, "date": "2026-12-07"}}
    save_weights(path, model.state_dict(), meta)
    (path.parent / "config.yaml").write_text("model: preactresnet18\nepochs: 4\n")
    return path, model


def test_export_then_load_gives_identical_logits(run_checkpoint, tmp_path):
    path, model = run_checkpoint
    out = export(path, tmp_path / "pretrained" / "demo")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = preactresnet.from_pretrained(str(out))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    config = json.loads((out / "config.json").read_text())
    assert config["test_accuracy"] == 54.1 and config["recipe"]["epochs"] == 4 and config["classes"] == CLASSES
    card = (out / "README.md").read_text()
    assert "**54.10%**" in card and "python train.py --config configs/demo.yaml" in card
    assert config["training"]["steps"] == 1564 and "| training | 1,564 steps (4 epochs), 1.2 min: 2026-12-07 |" in card
    assert loaded.pretrained_config["model"] == "preactresnet18"


def test_export_command_and_test_py_with_pretrained(run_checkpoint, tmp_path, capsys):
    path, _ = run_checkpoint
    main_export(["--checkpoint", str(path), "--out", str(tmp_path / "pre")])
    assert "exported" in capsys.readouterr().out
    main_test(["--pretrained", str(tmp_path / "pre"), "--json", "--no-figures", "--amp", "off"])
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "preactresnet18" and r["total"] == 2000


def test_strict_loading_rejects_a_mismatched_folder(run_checkpoint, tmp_path):
    path, model = run_checkpoint
    out = export(path, tmp_path / "pre")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_weights(out / "model.safetensors", state, read_metadata(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys"):
        preactresnet.from_pretrained(str(out))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(pickle.dumps({"w": Evil()}))
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError):
        preactresnet.from_pretrained(str(folder))
    torch.save({"w": Evil()}, folder / "model.safetensors", pickle_module=pickle)  # a torch zip pickle too
    with pytest.raises(CheckpointError):
        preactresnet.from_pretrained(str(folder))
    assert not marker.exists()


def test_repo_id_offline_is_one_line(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("Cannot reach https://huggingface.co: connection refused\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as err:
        preactresnet.from_pretrained("someone/preactresnet18-cifar10")
    assert "\n" not in str(err.value) and "local pretrained folder" in str(err.value)
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        preactresnet.from_pretrained("no/such/folder")


def test_fine_tuning_start_and_model_check(run_checkpoint, tmp_path):
    path, model = run_checkpoint
    out = export(path, tmp_path / "pre")
    fresh = create_model("preactresnet18", **{**ARGS, "num_classes": 100})
    message = load_pretrained_into(fresh, "preactresnet18", str(out))
    assert "new classifier head" in message
    assert torch.equal(fresh.stem.weight, model.stem.weight)
    with pytest.raises(CheckpointError, match="not resnext29_32x4d"):
        load_pretrained_into(create_model("resnext29_32x4d", width_mult=0.125), "resnext29_32x4d", str(out))
    with pytest.raises(CheckpointError, match="does not fit this PreActResNet .*size mismatch.*; check --width-mult") as err:
        load_pretrained_into(create_model("preactresnet18", width_mult=0.25), "preactresnet18", str(out))
    assert "\n" not in str(err.value)


def test_torch_hub_load(run_checkpoint, tmp_path):
    path, model = run_checkpoint
    out = export(path, tmp_path / "pre")
    m = torch.hub.load(str(ROOT), "resnext29_32x4d", source="local", width_mult=0.25)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    p = torch.hub.load(str(ROOT), "preactresnet18", source="local", pretrained=str(out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(p(x), model(x))


def test_the_model_cards_training_row_takes_what_is_recorded():
    """config.json's 'training' (steps, epochs, minutes, budget, CPU kind) becomes one card row; partial or odd ones do not crash it."""
    base = {"model": "preactresnet18", "model_args": {}, "classes": ["a"], "mean": [0], "std": [1]}
    full = {"steps": 4636, "epochs": 12, "minutes": 54.4, "budget": "an hour's steps", "cpu_kind": "AMX"}
    assert "| training | 4,636 steps (12 epochs), 54.4 min: an hour's steps; AMX |" in model_card({**base, "training": full})
    assert "| training | ? steps (12 epochs), ? min |" in model_card({**base, "training": {"epochs": 12}})
    assert "| training |" not in model_card({**base, "training": "a note"}) + model_card(base)


def test_the_model_cards_epochs_and_selection_rows_say_where_weights_come_from():
    """A run from --pretrained trained only its own epochs, an averaged file is no one run's: the card says both."""
    base = {"model": "preactresnet18", "model_args": {}, "classes": ["a"], "mean": [0], "std": [1], "epoch": 8}
    assert "| epochs | 8 (checkpoint from epoch 8) |" in model_card({**base, "recipe": {"epochs": 8}})
    tuned = model_card({**base, "recipe": {"epochs": 8, "pretrained": "checkpoints/x1/last.safetensors"}})
    assert "| epochs | 8 (checkpoint from epoch 8), fine-tuning `checkpoints/x1/last.safetensors` |" in tuned
    soup = model_card({**base, "ema": True, "averaged": ["pretrained/a", "b/ema.safetensors"]})
    assert "| selection | the mean of `pretrained/a` and `b/ema.safetensors` |" in soup


def test_exporting_a_training_state_names_the_weights_to_pass(tmp_path, capsys):
    """A user who passes last.state.pt (torch.save) gets told which file holds the weights, not 'corrupt'."""
    state = tmp_path / "last.state.pt"
    save_state(state, {"epoch": 1, "model": {"w": torch.zeros(2)}})
    with pytest.raises(SystemExit):
        main_export(["--checkpoint", str(state), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "is a training state" in err and "last.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_ema_is_never_answered_with_the_plain_weights(run_checkpoint, capsys):
    """test.py --ema on a run trained without --ema used to score its last weights under the EMA's name."""
    from preactresnet.inference import resolve_checkpoint

    path, model = run_checkpoint
    run = path.parent
    save_weights(run / "last.safetensors", model.state_dict(), read_metadata(path))
    with pytest.raises(SystemExit):
        main_test(["--ema", "--checkpoint", str(run), "--amp", "off", "--no-figures"])
    assert "holds no ema.safetensors" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="plain weights, not its EMA"):
        resolve_checkpoint(str(path), ema=True)
    save_weights(run / "ema.safetensors", model.state_dict(), {**read_metadata(path), "ema": True})
    assert resolve_checkpoint(str(run), ema=True) == run / "ema.safetensors"
    assert resolve_checkpoint(str(run / "ema.safetensors"), ema=True) == run / "ema.safetensors"


def test_averaged_weights_export_with_their_sources(run_checkpoint, tmp_path, capsys):
    """bench/average_weights.py: floats averaged (BN statistics too), integers and metadata from the last file, less its
    figures; the export carries the sources into config.json; another network, other classes, a run folder or a folder
    as --out are refused in one line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("average_weights", ROOT / "bench" / "average_weights.py")
    avg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(avg)
    path, model = run_checkpoint
    state = model.state_dict()
    other = path.parent / "other.safetensors"
    save_weights(other, {k: v * 3 if v.is_floating_point() else v + 7 for k, v in state.items()}, read_metadata(path))
    soup = path.parent / "soup.safetensors"
    avg.main([str(path), str(other), "--out", str(soup)])
    out = export(soup, tmp_path / "soup")
    averaged = preactresnet.from_pretrained(str(out)).state_dict()
    for key, value in state.items():
        expected = value * 2 if value.is_floating_point() else value + 7
        assert torch.allclose(averaged[key], expected), key
    config = json.loads((out / "config.json").read_text())
    assert config["averaged"] == [path.name, other.name]  # outside the working folder: names alone, as data paths
    assert config["test_accuracy"] is None and config["training"] is None  # the last file's figures are not the mean's
    wide = tmp_path / "wide.safetensors"
    save_weights(wide, create_model("preactresnet18", **{**ARGS, "width_mult": 0.25}).state_dict(), read_metadata(path))
    relabelled = tmp_path / "relabelled.safetensors"
    save_weights(relabelled, state, {**read_metadata(path), "classes": CLASSES[::-1]})
    refused = {"holds another network": [path, wide], "differs from .* in classes": [path, relabelled],
               "holds no model.safetensors": [path, path.parent], "no .safetensors file name": [path, other, "--out", tmp_path]}
    for message, args in refused.items():
        with pytest.raises(SystemExit, match=message):
            avg.main([str(a) for a in args] + ([] if "--out" in args else ["--out", str(tmp_path / "x.safetensors")]))
