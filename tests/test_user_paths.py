"""What a user's paths and arguments meet in the evaluating commands (export, test_with_checkpoints, predict,
optimize_system): a one-line error that names the problem and the fix, and nothing of theirs written over."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from PIL import Image

import preactresnet
from preactresnet.checkpoint import CheckpointError, load_weights, save_weights
from preactresnet.cli import main_checkpoints, main_export, main_optimize, main_predict
from preactresnet.data.sources import SAMPLE_FILE
from preactresnet.hub import BUNDLED_DIR, CONFIG_NAME, WEIGHTS_NAME
from test_hub import run_checkpoint  # noqa: F401  (a fixture: a tiny trained-looking checkpoint)


def _one_line_error(capsys, run, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_export_never_writes_over_a_users_files(run_checkpoint, tmp_path, capsys):  # noqa: F811
    """export.py --out a folder of someone's notes replaced their README.md and config.json without a word."""
    path, _ = run_checkpoint
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("# my notes\n")
    (notes / "config.json").write_text('{"mine": 1}\n')
    err = _one_line_error(capsys, main_export, ["--checkpoint", str(path), "--out", str(notes)])
    assert "holds other files (README.md, config.json)" in err
    assert (notes / "README.md").read_text() == "# my notes\n" and not (notes / WEIGHTS_NAME).exists()
    (tmp_path / "a_file").write_text("x")
    assert "is a file" in _one_line_error(capsys, main_export, ["--checkpoint", str(path), "--out", str(tmp_path / "a_file")])
    main_export(["--checkpoint", str(path), "--out", str(tmp_path / "new")])
    main_export(["--checkpoint", str(path), "--out", str(tmp_path / "new")])  # over its own earlier export: allowed
    assert "exported" in capsys.readouterr().out


def test_saved_weights_are_readable_by_others_as_the_umask_says(run_checkpoint, tmp_path):  # noqa: F811
    """safetensors creates files owner-only (0600): an exported folder's weights were unreadable to other users
    while its config.json beside them was not."""
    path, _ = run_checkpoint
    main_export(["--checkpoint", str(path), "--out", str(tmp_path / "out")])
    mask = os.umask(0o022)
    os.umask(mask)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) == 0o666 & ~mask, name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask  # a run's checkpoint too


def test_export_measures_a_cifar100_model_without_the_cifar10_sample(run_checkpoint, tmp_path, capsys):  # noqa: F811
    """export.py --data-dir also scored every model on the bundled CIFAR-10 sample: a CIFAR-100 model failed there."""
    path, _ = run_checkpoint
    state, meta = load_weights(path)
    save_weights(tmp_path / "c100" / "best.safetensors", state, {**meta, "dataset": "cifar100"})  # as a fine-tuned one says
    main_export(["--checkpoint", str(tmp_path / "c100" / "best.safetensors"), "--out", str(tmp_path / "out"),
                 "--data-dir", str(SAMPLE_FILE)])  # a 10-class tree standing in for its data
    assert "measured on the exported weights" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert config["test_accuracy"] is not None and config.get("sample_accuracy") is None


@pytest.mark.slow(10)
def test_test_with_checkpoints_scores_the_shipped_weights_on_the_sample(tmp_path, capsys):
    """With no --data-dir the shipped weights were looked for in ./data (a download), not the bundled sample test.py uses."""
    main_checkpoints([str(BUNDLED_DIR / WEIGHTS_NAME), "--no-download", "--amp", "off", "--device", "cpu", "--json",
                      "--fig-dir", str(tmp_path / "fig"), "--log-dir", str(tmp_path / "runs")])
    (row,) = json.loads(capsys.readouterr().out)["checkpoints"]
    assert row["error"] is None and "sample" in row["data"] and "2000 images" in row["data"], row


def test_a_missing_checkpoint_row_names_no_flag_the_script_lacks(run_checkpoint, tmp_path, capsys):  # noqa: F811
    """test_with_checkpoints.py takes paths; its row for a mistyped one said "pass --checkpoint PATH", a flag it has not."""
    path, _ = run_checkpoint
    main_checkpoints([str(path), str(tmp_path / "lost.safetensors"), "--data-dir", "sample", "--amp", "off", "--device", "cpu",
                      "--json", "--fig-dir", str(tmp_path / "fig"), "--log-dir", str(tmp_path / "runs")])
    rows = {r["checkpoint"]: r for r in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows[str(path)]["error"] is None, rows
    error = rows[str(tmp_path / "lost.safetensors")]["error"]
    assert "not found; check the path" in error and "--checkpoint" not in error


def test_a_file_in_place_of_a_folder_is_one_line(run_checkpoint, tmp_path, capsys):  # noqa: F811
    """--fig-dir naming a file ended test_with_checkpoints.py in a FileExistsError traceback, its table unprinted."""
    path, _ = run_checkpoint
    (tmp_path / "f").write_text("x")
    err = _one_line_error(capsys, main_checkpoints, [str(path), "--data-dir", "sample", "--amp", "off", "--device", "cpu",
                                                     "--fig-dir", str(tmp_path / "f"), "--log-dir", str(tmp_path / "runs")])
    assert "a file stands where a folder is needed" in err and str(tmp_path / "f") in err
    err = _one_line_error(capsys, main_optimize, ["--profile", str(tmp_path), "--quick", "--no-priority"])
    assert "is a folder" in err  # before any timing, not after it


def test_a_bare_pretrained_before_the_images_says_so(tmp_path, capsys, monkeypatch):
    """`predict.py --pretrained cat.png dog.png`: --pretrained took cat.png, and the error named a missing checkpoint."""
    monkeypatch.chdir(tmp_path)
    for name in ("cat.png", "dog.png"):
        Image.new("RGB", (32, 32), (120, 90, 60)).save(name)
    (tmp_path / "photos").mkdir()
    err = _one_line_error(capsys, main_predict, ["--pretrained", "cat.png", "dog.png"])
    assert "no weights file or pretrained folder" in err and "put it last" in err
    err = _one_line_error(capsys, main_predict, ["--pretrained", "photos", "cat.png"])
    assert "no pretrained folder" in err and "put it last" in err
    with pytest.raises(SystemExit):  # argparse's own error: its usage, then one line
        main_predict(["cat.png", "--pretrained", "--top-k", "0"])
    assert "--top-k: '0' is not a whole number of at least 1" in capsys.readouterr().err


def test_a_mistyped_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """--pretrained pretrained/RUNX (README's form, mistyped) went to the Hub and spoke only of the network."""
    import huggingface_hub

    def no_network(**kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained" / "RUN").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no such folder in pretrained/"):
        preactresnet.from_pretrained("pretrained/RUNX")


def test_a_runs_checkpoint_as_pretrained(run_checkpoint, tmp_path, capsys):  # noqa: F811
    """--pretrained checkpoints/<run>/best.safetensors was taken for its folder, then failed on a model.safetensors never named."""
    from preactresnet.hub import load_pretrained_into
    from preactresnet.models import create_model

    path, model = run_checkpoint
    fresh = create_model("preactresnet18", width_mult=0.125)
    assert "loaded pretrained weights" in load_pretrained_into(fresh, "preactresnet18", str(path))  # train.py fine-tunes from it
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    Image.new("RGB", (32, 32), (120, 90, 60)).save(tmp_path / "cat.png")
    err = _one_line_error(capsys, main_predict, [str(tmp_path / "cat.png"), "--pretrained", str(path)])
    assert "is a training checkpoint, not a pretrained folder: pass --checkpoint" in err
