"""A checkpoint or weights file that cannot be used (truncated, another model, another class count) ends the command
with exit code 2 and one line naming the file and what does not match."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _reliability import FAST, cli, error_line, mentions, trained_run


@pytest.fixture(scope="module")
def run(shapes4, tmp_path_factory):
    return trained_run(shapes4, tmp_path_factory)["result"]


def _train(root: Path, *extra: str) -> list[str]:
    # the trained run's settings (tests/conftest.py tiny_config), so a resume that is not refused only evaluates
    return [
        "train",
        f"--data.root={root}",
        *FAST,
        "--data.batch_size=8",
        "--data.workers=0",
        "--optim.epochs=2",
        "--optim.lr=0.01",
        "--model.freeze=until:layer3",
        *extra,
    ]


def _eval(ckpt: Path, data: Path) -> list[str]:
    return [
        "eval",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]


def _resumable_copy(run, dst: Path) -> Path:
    """The run's last.pt and config.toml in a fresh folder (a resume with an explicit path writes next to it)."""
    dst.mkdir()
    shutil.copy(run.paths["last"], dst / "last.pt")
    shutil.copy(run.run_dir / "config.toml", dst / "config.toml")
    return dst / "last.pt"


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# --------------------------------------------------------------------------------------------------------------------
# Truncated


def test_eval_of_a_truncated_checkpoint(run, shapes4, tmp_path) -> None:
    bad = _truncated(run.paths["last"], tmp_path / "cut.pt")
    rc, err = cli(*_eval(bad, shapes4 / "val"))
    line = error_line(err)
    assert rc == 2 and mentions(line, str(bad), "cannot load")


def test_resume_from_a_truncated_checkpoint(run, shapes4, tmp_path) -> None:
    ckpt = _resumable_copy(run, tmp_path / "r")
    _truncated(ckpt, ckpt)
    rc, err = cli(*_train(shapes4, f"--resume={ckpt}"))
    assert rc == 2 and mentions(error_line(err), str(ckpt), "cannot load")


def test_truncated_safetensors_weights(run, shapes4, tmp_path) -> None:
    bad = _truncated(run.paths["model_export"], tmp_path / "w.safetensors")
    rc, err = cli(*_train(shapes4, f"--model.weights={bad}", f"--run.out_dir={tmp_path / 'runs'}"))
    assert rc == 2 and mentions(error_line(err), str(bad), "cannot load")


# --------------------------------------------------------------------------------------------------------------------
# Another model


def test_eval_of_a_checkpoint_whose_weights_are_another_model(run, shapes4, tmp_path) -> None:
    state = torch.load(run.paths["last"], map_location="cpu", weights_only=True)
    state["meta"]["model_name"] = "resnet34"  # resnet18 weights under a resnet34 label
    bad = tmp_path / "relabelled.pt"
    torch.save(state, bad)
    rc, err = cli(*_eval(bad, shapes4 / "val"))
    line = error_line(err)
    assert rc == 2 and mentions(line, str(bad), "does not match", "layer1.2.")  # a resnet34 block resnet18 lacks


def test_resume_with_another_model_name(run, shapes4, tmp_path) -> None:
    ckpt = _resumable_copy(run, tmp_path / "r")
    rc, err = cli(*_train(shapes4, f"--resume={ckpt}", "--model.name=resnet34"))
    line = error_line(err)
    assert rc == 2 and mentions(line, str(ckpt), "model.name", "resnet18", "resnet34")


def test_weights_of_another_model(run, shapes4, tmp_path) -> None:
    w = run.paths["model_export"]
    rc, err = cli(*_train(shapes4, f"--model.weights={w}", "--model.name=resnet34", f"--run.out_dir={tmp_path}"))
    line = error_line(err)
    assert rc == 2 and mentions(line, str(w), "does not match", "resnet34", "layer1.2.")


# --------------------------------------------------------------------------------------------------------------------
# Another class count


def test_resume_with_data_of_another_class_count(run, shapes2, tmp_path) -> None:
    ckpt = _resumable_copy(run, tmp_path / "r")  # trained on shapes4: 4 classes; shapes2 has 2
    rc, err = cli(*_train(shapes2, f"--resume={ckpt}"))
    line = error_line(err)
    assert rc == 2 and mentions(line, str(ckpt), "classes")


def test_weights_of_another_class_count(run, shapes2, tmp_path) -> None:
    w = run.paths["model_export"]
    rc, err = cli(*_train(shapes2, f"--model.weights={w}", f"--run.out_dir={tmp_path}"))
    line = error_line(err)
    assert rc == 2 and mentions(line, str(w), "does not match", "fc.weight", "(4, 512)", "(2, 512)")


# --------------------------------------------------------------------------------------------------------------------
# What a refused resume must not do, and what it must refuse


def test_a_refused_resume_leaves_the_run_folder_untouched(run, shapes2, tmp_path) -> None:
    ckpt = _resumable_copy(run, tmp_path / "r")
    before = {p.name: p.read_bytes() for p in ckpt.parent.iterdir()}
    rc, err = cli(*_train(shapes2, f"--resume={ckpt}"))
    assert rc == 2, err
    assert {p.name: p.read_bytes() for p in ckpt.parent.iterdir()} == before


def test_resume_with_another_batch_size_is_refused(run, shapes4, tmp_path) -> None:
    ckpt = _resumable_copy(run, tmp_path / "r")  # saved with data.batch_size=8; ends the run if not refused (cheap)
    rc, err = cli(*_train(shapes4, f"--resume={ckpt}", "--data.batch_size=4"))
    assert rc == 2, err[-2000:]
    line = error_line(err)
    assert mentions(line, str(ckpt), "data.batch_size")


def test_a_resume_is_refused_before_the_model_or_loaders_are_built(run, shapes4, tmp_path, monkeypatch) -> None:
    """The checkpoint is read (once) and checked first: a refusal costs no model build and starts no data workers."""
    from conftest import tiny_config

    import fastft.inputs
    import fastft.trainer as train
    from fastft.errors import ConfigError

    def must_not_run(*args, **kwargs):
        raise AssertionError("built before the resume was checked")

    monkeypatch.setattr(train, "build_backbone", must_not_run)
    monkeypatch.setattr(fastft.inputs, "build_loader", must_not_run)
    ckpt = _resumable_copy(run, tmp_path / "r")
    cfg = tiny_config(shapes4, tmp_path, model__freeze="until:layer3", data__batch_size=4, checkpoint__resume=str(ckpt))
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        train.finetune(cfg)
