import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from preactresnet.checkpoint import save_weights
from preactresnet.cli import main_checkpoints, main_predict, main_test
from preactresnet.models import create_model

ARGS = {"num_classes": 10, "width_mult": 0.125, "drop_rate": 0.0, "zero_init_residual": False}


@pytest.fixture(scope="session")
def fitted(sample_dataset):
    """A small model, briefly fitted so its predictions are not constant (built once per session)."""
    torch.manual_seed(0)
    model = create_model("preactresnet18", **ARGS)
    ds = sample_dataset
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(ds.train_labels), generator=torch.Generator().manual_seed(0))
    for i in range(60):
        idx = order[i * 64 : (i + 1) * 64]
        x = (ds.train_images[idx].float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(model(x), ds.train_labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in model.modules():  # BN statistics of the final weights (a short run leaves them near init)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model((ds.train_images[order[:1000]].float() / 255 - mean) / std)
    return model.state_dict()


@pytest.fixture()
def checkpoint(tmp_path, sample_dataset, fitted):
    """The fitted model saved as train.py saves it, in a fresh run folder for each test."""
    ds = sample_dataset
    meta = {"model": "preactresnet18", "model_args": ARGS, "classes": ds.classes, "mean": list(ds.mean),
            "std": list(ds.std), "dataset": "cifar10", "data_dir": "sample", "run": "tiny", "epoch": 3}
    path = tmp_path / "ck" / "tiny" / "best.safetensors"
    save_weights(path, fitted, meta)
    return path


def run_json(capsys, fn, argv):
    fn(argv)
    return json.loads(capsys.readouterr().out)


def independent(path, ds, flip=False):
    """Accuracy and per-class accuracy computed here, without the package's loaders (with flip: the mean
    softmax of each image and its mirror, what --tta flip means)."""
    model = create_model("preactresnet18", **ARGS)
    model.load_state_dict(load_file(path))
    model.eval()
    x = (ds.test_images.float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / torch.tensor(ds.std).view(1, 3, 1, 1)

    def probs(v):
        return model(v.contiguous(memory_format=torch.channels_last)).softmax(1)

    with torch.no_grad():
        pred = torch.cat([
            (probs(x[i : i + 500]) + (probs(x[i : i + 500].flip(3)) if flip else 0)).argmax(1) for i in range(0, len(x), 500)
        ])
    right = pred == ds.test_labels
    per_class = [100 * float(right[ds.test_labels == c].float().mean()) for c in range(10)]
    return 100 * float(right.float().mean()), per_class


def test_accuracy_matches_an_independent_computation(checkpoint, sample_dataset, capsys, tmp_path):
    r = run_json(capsys, main_test, ["--checkpoint", str(checkpoint), "--json", "--amp", "off", "--device", "cpu", "--fig-dir", str(tmp_path / "fig")])
    acc, per_class = independent(checkpoint, sample_dataset)
    assert r["total"] == 2000 and r["accuracy"] == pytest.approx(acc, abs=1e-3)
    assert list(r["per_class"].values()) == pytest.approx(per_class, abs=1e-3)
    assert 15 < r["accuracy"] < 90, "the fixture model should be better than chance"
    assert sum(map(sum, r["confusion"])) == 2000
    for name in ("confusion_matrix.png", "per_class_accuracy.png", "test_predictions.png", "reliability.png", "confusion_matrix.csv"):
        assert (tmp_path / "fig" / "tiny" / name).stat().st_size > 100


@pytest.mark.slow(10)
def test_tta_keeps_the_plain_figure_and_text_matches_json(checkpoint, sample_dataset, capsys, tmp_path):
    base = ["--checkpoint", str(checkpoint), "--amp", "off", "--no-figures"]
    plain = run_json(capsys, main_test, [*base, "--json"])
    for mode in ("flip", "flip-translate"):
        r = run_json(capsys, main_test, [*base, "--json", "--tta", mode])
        assert r["accuracy"] == plain["accuracy"] and 0 < r["tta_accuracy"] <= 100
        if mode == "flip":
            assert r["tta_accuracy"] == pytest.approx(independent(checkpoint, sample_dataset, flip=True)[0], abs=0.051)
    main_test([*base, "--tta", "flip"])
    text = capsys.readouterr().out
    assert f"test accuracy: {plain['accuracy']:.2f}%" in text and "with TTA (flip)" in text
    assert f"{plain['per_class']['cat']:6.2f}%" in text


def test_default_checkpoint_is_newest_runs_best(checkpoint, capsys):
    r = run_json(capsys, main_test, ["--checkpoint-dir", str(checkpoint.parent.parent), "--json", "--no-figures", "--amp", "off"])
    assert r["checkpoint"] == str(checkpoint) and r["run"] == "tiny"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong-model", "wrong-classes", "missing"])
def test_bad_checkpoints_give_one_line(checkpoint, capsys, damage):
    path = checkpoint
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a checkpoint" * 50)
    elif damage in ("wrong-model", "wrong-classes"):
        weights = load_file(path)
        from preactresnet.checkpoint import read_metadata

        meta = read_metadata(path)
        if damage == "wrong-model":
            meta["model"] = "preactresnet34"
        else:
            meta["model_args"] = {**ARGS, "num_classes": 100}
        save_weights(path, weights, meta)
    else:
        path = path.parent / "nope.safetensors"
    with pytest.raises(SystemExit) as exit_:
        main_test(["--checkpoint", str(path), "--no-figures"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error:") and "\n" not in err, err


def test_checkpoint_table_reports_bad_rows_and_goes_on(checkpoint, capsys, tmp_path):
    broken = checkpoint.parent / "last.safetensors"
    broken.write_bytes(b"broken")
    r = run_json(capsys, main_checkpoints, [str(checkpoint.parent), "--json", "--amp", "off", "--fig-dir", str(tmp_path / "fig")])
    rows = {row["checkpoint"]: row for row in r["checkpoints"]}
    assert rows[str(broken)]["error"] and rows[str(checkpoint)]["accuracy"] > 15
    assert (tmp_path / "fig" / "checkpoints_accuracy.png").is_file()


def test_predict_any_image(checkpoint, capsys, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(imgs / "rgba.png")
    Image.new("L", (32, 32), 90).save(imgs / "gray.png")
    Image.new("RGB", (1600, 900), (10, 200, 30)).save(imgs / "large.jpg")
    (imgs / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_:
        main_predict([str(imgs), "--checkpoint", str(checkpoint), "--json", "--top-k", "3"])
    assert exit_.value.code == 1  # one file failed, the rest were classified
    out = capsys.readouterr()
    r = json.loads(out.out)
    assert sorted(p["image"].rsplit("/", 1)[1] for p in r["predictions"]) == ["gray.png", "large.jpg", "rgba.png"]
    for p in r["predictions"]:
        assert len(p["top"]) == 3 and sum(t["probability"] for t in p["top"]) <= 1.0001
    assert "broken.png" in out.err and out.err.count("\n") == 1


def test_sixteen_bit_and_palette_alpha_images_load_as_they_look(tmp_path, capsys):
    """PIL's convert("RGB") clips 16-bit greyscale at 255 (a scan turns white); a PA image's clear pixels show white."""
    from preactresnet.data.trees import to_rgb
    from preactresnet.reporting import image_files, load_image

    gradient = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    Image.fromarray(gradient).save(tmp_path / "scan16.png")
    assert abs(load_image(tmp_path / "scan16.png").float().mean().item() - 127.5) < 3
    pa = Image.new("PA", (32, 32))  # black through a fully transparent alpha (PIL writes no PA file: made in memory)
    pa.putpalette([0, 0, 0] * 256)
    assert np.asarray(to_rgb(pa)).min() == 255
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(SystemExit):
        main_predict([str(tmp_path / "empty")])
    assert "no images in" in capsys.readouterr().err
    assert image_files([str(tmp_path)]) == [tmp_path / "scan16.png"]
