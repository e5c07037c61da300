"""Checkpoints: atomic writes, exact RNG resume, refusing code on load, clear mismatch errors, safetensors export."""

import json
import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fastft.checkpoint import (
    atomic_save,
    export_safetensors,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
)
from fastft.errors import CheckpointError
from fastft.model import load_state_file


class _Evil:
    """Unpickling this runs a shell command: the classic malicious-checkpoint payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_evil(path: Path, marker: Path, *, how: str) -> Path:
    if how == "torch.save":  # zip-format .pt with the payload inside an otherwise plausible checkpoint
        torch.save({"model": {"w": torch.ones(2)}, "meta": _Evil(marker)}, path)
    else:  # a bare pickle stream named .pt (torch.load's legacy path)
        with open(path, "wb") as f:
            pickle.dump(_Evil(marker), f, protocol=2)
    return path


def _net(num_classes: int) -> nn.Module:
    torch.manual_seed(num_classes)
    return nn.Sequential(OrderedDict(backbone=nn.Linear(8, 8), fc=nn.Linear(8, num_classes)))


def _checkpoint(model: nn.Module) -> dict:
    return {"model": model.state_dict(), "meta": {"num_classes": 3, "model": "toy", "epoch": 2}}


# --------------------------------------------------------------------------------------------------------------------
# atomic_save / load_checkpoint


def test_atomic_save_round_trips_and_creates_the_folder(tmp_path):
    model = _net(3)
    path = tmp_path / "run" / "nested" / "last.pt"
    atomic_save(_checkpoint(model), path)
    ckpt = load_checkpoint(path)
    assert ckpt["meta"] == {"num_classes": 3, "model": "toy", "epoch": 2}
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left


def test_atomic_save_failure_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(_checkpoint(_net(3)), path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint" * 100)  # some bytes reach the temp file, then the disk "fills"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        atomic_save(_checkpoint(_net(5)), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["model"]["fc.weight"].shape == (3, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_atomic_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_checkpoint(_net(3)), path)
    atomic_save(_checkpoint(_net(5)), path)
    assert load_checkpoint(path)["model"]["fc.weight"].shape == (5, 8)


def test_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_truncated_checkpoint_names_the_file(tmp_path):
    good = tmp_path / "good.pt"
    atomic_save(_checkpoint(_net(3)), good)
    bad = tmp_path / "truncated.pt"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load checkpoint") as exc:
        load_checkpoint(bad)
    assert str(bad) in str(exc.value)


@pytest.mark.parametrize(
    "obj", [{"weights": torch.ones(2)}, {"model": {}}, [torch.ones(2)]], ids=["dict", "no-meta", "list"]
)
def test_non_fastft_object_is_refused_naming_the_file(tmp_path, obj):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a fastft checkpoint") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_the_malicious_payload_is_real(tmp_path):
    # control: an unsafe load of the same kind of file does run the command, so the refusal tests below are meaningful
    marker = tmp_path / "control-marker"
    path = _write_evil(tmp_path / "evil.pt", marker, how="torch.save")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_checkpoint_refuses_a_malicious_pickle_without_running_it(tmp_path, how):
    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "evil.pt", marker, how=how)
    with pytest.raises(CheckpointError, match="pickled objects that could run code") as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# RNG state


def _draws() -> tuple:
    return (
        torch.rand(4).tolist(),
        [random.random() for _ in range(3)],
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
    )


def _advance_generators() -> None:
    # leave a cached Gaussian in numpy (has_gauss=1) and in Python's random, so the cache must be restored too
    torch.rand(7)
    random.random()
    random.gauss(0, 1)
    np.random.standard_normal()


def test_rng_state_round_trip_reproduces_the_draws():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _advance_generators()
    state = rng_state()
    assert state["numpy"]["has_gauss"] == 1
    expected = _draws()
    _draws()  # move every generator on
    set_rng_state(state)
    assert _draws() == expected


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    _advance_generators()
    path = tmp_path / "last.pt"
    atomic_save({**_checkpoint(_net(3)), "rng": [rng_state()]}, path)
    expected = _draws()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)

    ckpt = load_checkpoint(path)  # weights_only=True: the state holds only tensors and plain containers
    set_rng_state(ckpt["rng"][0])
    assert _draws() == expected


# --------------------------------------------------------------------------------------------------------------------
# load_model_state


def test_load_model_state_names_the_file_and_the_mismatching_head(tmp_path):
    model = _net(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "ten_classes.pt"
    with pytest.raises(CheckpointError) as exc:
        load_model_state(model, _net(10).state_dict(), path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "fc.weight (10, 8) != model (3, 8)" in msg
    # nothing was loaded, not even the matching backbone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_model_state_names_missing_and_unexpected_keys(tmp_path):
    state = _net(3).state_dict()
    state["extra.weight"] = state.pop("fc.bias")
    with pytest.raises(CheckpointError) as exc:
        load_model_state(_net(3), state, tmp_path / "x.pt")
    msg = str(exc.value)
    assert "missing keys ['fc.bias']" in msg
    assert "unexpected keys ['extra.weight']" in msg


def test_load_model_state_loads_a_matching_state():
    model, source = _net(3), _net(4)
    source.fc = nn.Linear(8, 3)
    load_model_state(model, source.state_dict(), "src.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# export_safetensors


def test_export_safetensors_writes_the_tensors_and_a_json_sidecar(tmp_path):
    model = _net(3)
    meta = {"model": "toy", "num_classes": 3, "classes": ["a", "b", "c"], "part": "head"}
    path = tmp_path / "head.safetensors"
    assert export_safetensors(model, path, meta) == path

    loaded = load_file(str(path))
    state = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert json.loads((tmp_path / "head.json").read_text()) == meta
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["fastft"]) == meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]


# --------------------------------------------------------------------------------------------------------------------
# fastft.model.load_state_file


def test_load_state_file_reads_pt_state_dicts_and_checkpoints(tmp_path):
    state = _net(3).state_dict()
    torch.save(state, tmp_path / "plain.pt")
    atomic_save(_checkpoint(_net(3)), tmp_path / "ckpt.pt")
    for name in ("plain.pt", "ckpt.pt"):
        loaded = load_state_file(tmp_path / name)
        assert set(loaded) == set(state)
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_state_file_reads_safetensors(tmp_path):
    state = {k: v.contiguous() for k, v in _net(3).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_state_file(tmp_path / "w.safetensors")
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_state_file_refuses_a_malicious_pickle_without_running_it(tmp_path, how):
    marker = tmp_path / "pwned"
    path = _write_evil(tmp_path / "weights.pt", marker, how=how)
    with pytest.raises(CheckpointError, match="refusing to unpickle objects that could run code") as exc:
        load_state_file(path)
    assert str(path) in str(exc.value)
    assert not marker.exists()


def test_load_state_file_refuses_a_dict_that_is_not_tensors(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not a state dict of tensors") as exc:
        load_state_file(path)
    assert str(path) in str(exc.value)


def test_load_state_file_missing_names_the_file(tmp_path):
    path = tmp_path / "none.safetensors"
    with pytest.raises(CheckpointError, match="not found") as exc:
        load_state_file(path)
    assert str(path) in str(exc.value)
