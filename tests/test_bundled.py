"""The weights shipped in the package: usable on a fresh clone with no training and no network."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

import preactresnet
from preactresnet import hub
from preactresnet.checkpoint import read_metadata
from preactresnet.cli import main_export, main_predict, main_test
from preactresnet.hub import BUNDLED_DIR, CONFIG_NAME, WEIGHTS_NAME, push_to_hub
from preactresnet.inference import accuracy_on, load_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = json.loads((BUNDLED_DIR / CONFIG_NAME).read_text())


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow(15)
def test_the_bundled_weights_reproduce_their_sample_accuracy():
    meta = read_metadata(BUNDLED_DIR / WEIGHTS_NAME)
    for key in ("command", "seed", "machine", "test_accuracy", "sample_accuracy", "data_description"):
        assert meta.get(key) not in (None, ""), key
    assert meta.get("selected_on") is None and meta["epoch"] == CONFIG["recipe"]["epochs"]  # the last epoch's, not picked on test
    assert "configs/cpu_15min.yaml" in meta["command"] and "10000 images" in meta["data_description"]
    run = CONFIG["training"]  # steps, epochs, minutes and CPU kind, in config.json and on the model card
    assert {"steps", "epochs", "minutes", "cpu_kind"} <= set(run) and meta["training"] == run
    assert f"{run['steps']:,} steps ({run['epochs']} epochs)" in (BUNDLED_DIR / "README.md").read_text()
    accuracy, described = accuracy_on(load_model(BUNDLED_DIR / WEIGHTS_NAME, "cpu"), "sample")
    assert "2000 images" in described
    assert abs(accuracy - meta["sample_accuracy"]) <= 0.1, (accuracy, meta["sample_accuracy"])
    assert CONFIG["sample_accuracy"] == meta["sample_accuracy"]
    # the paper's width in fp16 is 22.4 MB: under GitHub's 50 MB warning and far under PyPI's 100 MB wheel limit
    assert (BUNDLED_DIR / WEIGHTS_NAME).stat().st_size < 25_000_000


def test_pretrained_true_everywhere_gives_the_same_network():
    x = torch.randn(2, 3, 32, 32)
    reference = logits(preactresnet.from_pretrained(), x)
    assert torch.equal(logits(preactresnet.create_model("preactresnet18", pretrained=True), x), reference)
    assert torch.equal(logits(timm.create_model("preactresnet18", pretrained=True), x), reference)
    hubbed = torch.hub.load(str(ROOT), "preactresnet18", source="local", pretrained=True)
    assert torch.equal(logits(hubbed, x), reference)
    assert logits(preactresnet.create_model("preactresnet18"), x).shape == (2, 10)  # no pretrained: a fresh net


def test_pretrained_true_refuses_another_model_or_width_in_one_line():
    with pytest.raises(ValueError, match="bundled weights are preactresnet18, not resnext29_32x4d") as err:
        preactresnet.create_model("resnext29_32x4d", pretrained=True)
    assert "\n" not in str(err.value)
    width = CONFIG["model_args"]["width_mult"]
    with pytest.raises(ValueError, match="drop those options"):
        preactresnet.create_model("preactresnet18", pretrained=True, width_mult=0.5 if width == 1.0 else 1.0)
    assert preactresnet.create_model("preactresnet18", pretrained=True, width_mult=width) is not None


def test_predict_with_nothing_trained_uses_the_bundled_weights(sample_dataset, tmp_path, monkeypatch, capsys):
    from PIL import Image

    image = tmp_path / "images" / "one.png"
    image.parent.mkdir()
    Image.fromarray(sample_dataset.test_images[0].permute(1, 2, 0).numpy()).save(image)
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    main_predict([str(image.parent), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "nothing trained under checkpoints/ yet: using the bundled weights" in err
    result = json.loads(out)
    assert Path(result["checkpoint"]).resolve() == (BUNDLED_DIR / WEIGHTS_NAME).resolve()
    assert result["predictions"][0]["top"][0]["class"] in CONFIG["classes"]


@pytest.mark.slow(15)
def test_test_py_bare_pretrained_scores_the_sample_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main_test(["--pretrained", "--json", "--no-figures", "--amp", "off", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert "bundled 2,000-image sample" in err
    report = json.loads(out)
    assert report["total"] == 2000 and abs(report["accuracy"] - CONFIG["sample_accuracy"]) <= 0.1


@pytest.mark.slow(15)
def test_export_of_the_bundled_weights_in_half_precision_records_its_accuracy(tmp_path, capsys):
    main_export(["--pretrained", "--out", str(tmp_path / "half"), "--half", "--data-dir", "sample"])
    assert "measured on the exported weights" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "half" / WEIGHTS_NAME)
    assert meta["weights_dtype"] == "float16" and meta["command"] == CONFIG["command"]
    assert abs(meta["sample_accuracy"] - CONFIG["sample_accuracy"]) <= 0.2
    config = json.loads((tmp_path / "half" / CONFIG_NAME).read_text())
    assert config["recipe"] == CONFIG["recipe"] and config["sample_accuracy"] == meta["sample_accuracy"]
    assert f"{meta['sample_accuracy']:.2f}%" in (tmp_path / "half" / "README.md").read_text()


class LocalHub:
    """A stand-in for the Hugging Face Hub: repos are folders under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, exist_ok=False, private=False):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, folder_path, repo_id, allow_patterns):
        for name in allow_patterns:
            shutil.copy2(Path(folder_path) / name, self.root / repo_id / name)
        return type("CommitInfo", (), {"commit_url": f"local://{repo_id}"})()

    def snapshot_download(self, repo_id, allow_patterns, cache_dir=None):
        return str(self.root / repo_id)


def test_push_then_load_by_repo_id_through_a_local_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    local = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: local)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "token")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", local.snapshot_download)
    main_export(["--pretrained", "--out", str(tmp_path / "out"), "--push-to-hub", "someone/preactresnet18-cpu15min"])
    assert "pushed to local://someone/preactresnet18-cpu15min" in capsys.readouterr().out
    pushed = sorted(p.name for p in (tmp_path / "hub" / "someone" / "preactresnet18-cpu15min").iterdir())
    assert pushed == sorted(hub.HUB_FILES)
    x = torch.randn(2, 3, 32, 32)
    from_hub = preactresnet.from_pretrained("someone/preactresnet18-cpu15min")
    assert torch.equal(logits(from_hub, x), logits(preactresnet.from_pretrained(), x))
