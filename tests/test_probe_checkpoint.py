"""Probe checkpoints: with a frozen backbone from a weights file, last.pt/best.pt hold the trainable state and a
fingerprint of the frozen part; eval, predict and resume rebuild the frozen part from the file and refuse when it
changed; full checkpoints (freeze=none, and those written before) still load."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import run_cli, tiny_config
from safetensors.torch import load_file

import fastft
from fastft.checkpoint import atomic_save
from fastft.train import finetune

EVAL = {"device": "cpu", "precision": "fp32", "workers": 0}


def _weights(path: Path, model: torch.nn.Module) -> Path:
    """`model`'s state with non-trivial BatchNorm statistics (so a lost buffer would change the outputs)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    return _weights(tmp_path_factory.mktemp("w") / "r18.pth", torchvision.models.resnet18())


@pytest.fixture(scope="module")
def probe_file(r18_file, module_tmp) -> Path:
    """The probe's own copy of the weights (a test alters it, and puts it back)."""
    return Path(shutil.copy(r18_file, module_tmp("probe-w") / "r18.pth"))


@pytest.fixture(scope="module")
def probe(shapes4, probe_file, module_tmp):
    """A resnet18 linear probe from a weights file: 1 epoch of 3 steps."""
    cfg = tiny_config(
        shapes4, module_tmp("probe"), model__weights=str(probe_file), model__freeze="backbone", data__batch_size=16
    )
    cfg.optim.epochs = 1
    return finetune(cfg)


@pytest.fixture(scope="module")
def full_eval(probe, shapes4) -> dict:
    """The probe's full-model export evaluated: what every checkpoint of the same state must reproduce."""
    return fastft.evaluate(probe.paths["model_export"], shapes4 / "val", **EVAL).metrics


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_probe_checkpoint_holds_the_head_and_a_fingerprint_of_the_rest(probe, probe_file) -> None:
    model = torchvision.models.resnet18(num_classes=4)  # the same architecture, for its own sizes
    own = model.state_dict()
    head = {"fc.weight", "fc.bias"}
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(probe.run_dir / name, map_location="cpu", weights_only=True)
        assert set(ckpt["model"]) == head, name
        assert _nbytes(ckpt["model"].values()) == _nbytes(own[k] for k in head) == (4 * 512 + 4) * 4
        frozen = ckpt["frozen"]
        assert frozen["tensors"] == len(own) - 2
        assert frozen["bytes"] == _nbytes(v for k, v in own.items() if k not in head)
        assert (frozen["source"], frozen["name"], frozen["weights"]) == ("torchvision", "resnet18", str(probe_file))
    # The file: the head, optimizer, RNG and position; far below the frozen part's 44.7 MB.
    assert (probe.run_dir / "last.pt").stat().st_size < 100_000
    # The export still holds the full model.
    assert set(load_file(probe.paths["model_export"])) == set(own)


def test_eval_and_predict_from_a_probe_checkpoint_equal_the_full_model(probe, full_eval, shapes4, tmp_path) -> None:
    best = probe.run_dir / "best.pt"
    assert "frozen" in torch.load(best, map_location="cpu", weights_only=True)
    small = fastft.evaluate(best, shapes4 / "val", **EVAL).metrics
    full = full_eval
    assert small["confusion_matrix"] == probe.metrics["confusion_matrix"] == full["confusion_matrix"]
    assert small["loss"] == full["loss"]  # the same model, bit for bit
    assert small["loss"] == pytest.approx(probe.metrics["loss"], abs=1e-6)
    a = fastft.predict(best, shapes4 / "val", tmp_path / "a.csv", workers=0, device="cpu")
    b = fastft.predict(probe.paths["model_export"], shapes4 / "val", tmp_path / "b.csv", workers=0, device="cpu")
    assert a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 25


def test_an_old_full_checkpoint_still_evaluates_without_its_weights_file(probe, full_eval, shapes4, tmp_path) -> None:
    """A checkpoint as fastft wrote it before probe checkpoints (the whole model, no fingerprint) loads as it is:
    its weights file is not read (here it is gone)."""
    ckpt = torch.load(probe.run_dir / "best.pt", map_location="cpu", weights_only=True)
    ckpt.pop("frozen")
    ckpt["model"] = load_file(probe.paths["model_export"])
    ckpt["meta"]["config"]["model"]["weights"] = str(tmp_path / "gone.pth")
    atomic_save(ckpt, tmp_path / "old.pt")
    got = fastft.evaluate(tmp_path / "old.pt", shapes4 / "val", **EVAL).metrics
    assert got["loss"] == full_eval["loss"] and got["confusion_matrix"] == full_eval["confusion_matrix"]


class _Stop(Exception):
    pass


def test_resume_from_probe_checkpoints_across_an_unfreeze_equals_the_uninterrupted_run(
    shapes2, r18_file, tmp_path, monkeypatch
) -> None:
    """2 epochs x 2 steps; layer4.1 (4.7M of 11.2M parameters) unfreezes at epoch 2, so every save is a probe
    checkpoint; the run stops after step 3 (epoch 2, after the unfreeze) and resumes from last.pt."""
    from fastft.parallel.backend import LocalBackend

    common = {
        "model__weights": str(r18_file),
        "model__freeze": "backbone",
        "optim__unfreeze": ["2:layer4.1:0.1"],
        "checkpoint__every_steps": 1,
        "data__batch_size": 16,
    }
    full = finetune(tiny_config(shapes2, tmp_path, run__name="full", **common))
    real, calls = LocalBackend.step, {"n": 0}

    def stop_after_step_3(self, boundary=True):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Stop
        return real(self, boundary)

    monkeypatch.setattr(LocalBackend, "step", stop_after_step_3)
    with pytest.raises(_Stop):
        finetune(tiny_config(shapes2, tmp_path, run__name="cut", **common))
    monkeypatch.setattr(LocalBackend, "step", real)
    cut = tmp_path / "cut"
    own = torchvision.models.resnet18(num_classes=2).state_dict()
    # best.pt (epoch 1, before the unfreeze): the head; last.pt (step 3): the head and all of layer4.1, BN buffers too.
    before = torch.load(cut / "best.pt", map_location="cpu", weights_only=True)
    after = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)
    assert set(before["model"]) == {"fc.weight", "fc.bias"}
    assert after["step"] == 3 and set(after["model"]) == {k for k in own if k.startswith(("fc.", "layer4.1."))}
    assert after["frozen"]["tensors"] == len(own) - len(after["model"]) < before["frozen"]["tensors"]
    resumed = finetune(tiny_config(shapes2, tmp_path, run__name="cut", checkpoint__resume="auto", **common))
    a, b = load_file(full.paths["model_export"]), load_file(resumed.paths["model_export"])
    assert set(a) == set(b) == set(own)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["loss"] == full.metrics["loss"]


@pytest.mark.parametrize(
    ("policy", "weights", "probe_format"),
    [
        ("backbone", "w.pth", True),
        ("backbone", "DEFAULT", True),
        (["layer4.*"], "w.pth", True),
        ("until:layer3", "w.pth", False),
        ("none", "w.pth", False),
        ("backbone", "none", False),
    ],
)
def test_the_probe_format_rule(policy, weights: str, probe_format: bool) -> None:
    """A probe checkpoint when the frozen parameters are more than half of the model's and come from a weights source
    (a file or a pretrained tag): resnet18's layer4 holds 8.4M of its 11.2M parameters."""
    from fastft.backbones.freeze import freeze
    from fastft.checkpoint import uses_probe_format

    model = torchvision.models.resnet18(num_classes=4)
    freeze(model, policy, head="fc")
    assert uses_probe_format(model, weights) is probe_format


def test_a_changed_weights_file_is_refused_in_one_line(probe, probe_file, shapes4, tmp_path) -> None:
    """One number of the probe's weights file changed after the run: `fastft eval` exits 2 with one line naming the
    checkpoint and the file; predict and a resume refuse the same way (the run folder is left as it was)."""
    from fastft.errors import CheckpointError

    best, last = probe.run_dir / "best.pt", probe.run_dir / "last.pt"
    original = probe_file.read_bytes()
    state = torch.load(probe_file, weights_only=True)
    state["layer1.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, probe_file)
    try:
        proc = run_cli(
            "eval", "--checkpoint", str(best), "--data", str(shapes4 / "val"), "--workers", "0", "--device=cpu"
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastft: error: "), proc.stderr
        assert f"{best}: the weights at {probe_file} changed since the run" in lines[0]
        with pytest.raises(CheckpointError, match=re.escape(f"{best}: the weights at {probe_file} changed")):
            fastft.predict(best, shapes4 / "val", tmp_path / "p.csv", workers=0, device="cpu")
        assert not (tmp_path / "p.csv").exists()
        before = last.read_bytes()
        cfg = tiny_config(
            shapes4,
            probe.run_dir.parent,
            model__weights=str(probe_file),
            model__freeze="backbone",
            data__batch_size=16,
            optim__epochs=2,
            checkpoint__resume="auto",
        )
        with pytest.raises(CheckpointError, match=re.escape(f"{last}: the weights at {probe_file} changed")):
            finetune(cfg)
        assert last.read_bytes() == before
    finally:
        probe_file.write_bytes(original)


def test_timm_probe_checkpoint_evaluates_as_the_run(shapes4, tmp_path) -> None:
    """A timm resnet10t probe: its best.pt holds the head and a timm fingerprint, and evaluates as the run did."""
    timm = pytest.importorskip("timm")

    torch.manual_seed(3)
    weights = _weights(tmp_path / "r10t.pth", timm.create_model("resnet10t", pretrained=False))
    cfg = tiny_config(
        shapes4,
        tmp_path,
        model__source="timm",
        model__name="resnet10t",
        model__weights=str(weights),
        model__freeze="backbone",
        optim__max_steps=1,
    )
    result = finetune(cfg)
    best = result.run_dir / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert set(ckpt["model"]) == {"fc.weight", "fc.bias"}
    assert (ckpt["frozen"]["source"], ckpt["frozen"]["name"]) == ("timm", "resnet10t")
    report = fastft.evaluate(best, shapes4 / "val", **EVAL).metrics
    assert report["confusion_matrix"] == result.metrics["confusion_matrix"]
    assert report["loss"] == pytest.approx(result.metrics["loss"], abs=1e-6)
