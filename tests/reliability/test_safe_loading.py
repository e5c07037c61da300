"""Safe loading: checkpoints and weights are read with weights_only=True or safetensors; a crafted pickle that runs a
command when unpickled is refused with one line and the command never runs. The trained model round-trips as
safetensors."""

from __future__ import annotations

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _reliability import FAST, REPO, child_env, cli, error_line, mentions, one_thread, trained_run
from safetensors.torch import load_file


class _Evil:
    """Unpickling this runs a shell command (the classic malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path, *, how: str = "torch.save") -> Path:
    if how == "torch.save":  # a zip .pt that looks like a fastft checkpoint, with the payload in "meta"
        torch.save({"model": {"fc.weight": torch.zeros(4, 512)}, "meta": _Evil(marker)}, path)
    else:  # a bare pickle stream (torch.load's legacy format)
        with open(path, "wb") as f:
            pickle.dump(_Evil(marker), f, protocol=2)
    return path


@pytest.fixture(scope="module")
def run(shapes4, tmp_path_factory):
    return trained_run(shapes4, tmp_path_factory)["result"]


def test_the_payload_is_real(tmp_path) -> None:
    # Control: an unsafe load of the same file does run the command, so the refusals below mean something.
    marker = tmp_path / "pwned"
    torch.load(_evil(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_cli_eval_refuses_a_malicious_checkpoint(shapes4, tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / "evil.pt", marker)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastft",
            "eval",
            "--checkpoint",
            str(evil),
            "--data",
            str(shapes4 / "val"),
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    line = error_line(p.stderr)
    assert mentions(line, str(evil), "could run code")
    assert not marker.exists()


@pytest.mark.parametrize(
    "name,how", [("evil.pt", "torch.save"), ("evil.pth", "pickle"), ("evil.safetensors", "torch.save")]
)
def test_model_weights_refuses_a_malicious_file(shapes4, tmp_path, name, how) -> None:
    marker = tmp_path / "pwned"
    evil = _evil(tmp_path / name, marker, how=how)
    rc, err = cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        f"--model.weights={evil}",
        f"--run.out_dir={tmp_path / 'runs'}",
    )
    assert rc == 2 and mentions(error_line(err), str(evil), "cannot load")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_resume_and_predict_refuse_a_malicious_checkpoint(shapes4, tmp_path, how) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "run").mkdir()
    evil = _evil(tmp_path / "run" / "last.pt", marker, how=how)
    rc, err = cli("train", f"--data.root={shapes4}", *FAST, "--data.workers=0", f"--resume={evil}")
    assert rc == 2 and mentions(error_line(err), str(evil), "could run code")
    rc, err = cli(
        "predict",
        "--checkpoint",
        str(evil),
        "--input",
        str(shapes4 / "val"),
        "--out",
        str(tmp_path / "p.csv"),
        "--device",
        "cpu",
        "--workers",
        "0",
    )
    assert rc == 2 and mentions(error_line(err), str(evil), "could run code")
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_every_load_in_the_package_is_weights_only() -> None:
    """Static guard: each torch.load in fastft passes weights_only=True; no pickle.load(s), no np.load with pickles."""
    offences = []
    for path in sorted((REPO / "fastft").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            if name.endswith("torch.load") and kwargs.get("weights_only") != "True":
                offences.append(where)
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                offences.append(where)
            if name.endswith("np.load") and kwargs.get("allow_pickle", "False") != "False":
                offences.append(where)
    assert offences == []


# --------------------------------------------------------------------------------------------------------------------
# safetensors export and import


def test_exported_safetensors_rebuild_the_trained_model_exactly(run) -> None:
    from fastft.api import load_trained
    from fastft.config import ModelConfig
    from fastft.model import build_model

    meta = json.loads((run.run_dir / "model.json").read_text())
    assert meta["classes"] == ["checker", "circle", "cross", "diamond"] and meta["part"] == "model"
    trained, _ = load_trained(run.paths["last"], torch.device("cpu"))
    imported = build_model(
        ModelConfig(name=meta["model_name"], weights=str(run.paths["model_export"])), meta["num_classes"]
    ).eval()
    assert set(load_file(run.paths["model_export"])) == set(trained.state_dict())
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), one_thread():
        assert torch.equal(imported(x), trained(x))


def test_a_new_run_starts_from_the_exported_weights(run, shapes4, tmp_path) -> None:
    export = run.paths["model_export"]
    rc, err = cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=8",
        f"--model.weights={export}",
        "--model.freeze=backbone",
        "--optim.max_steps=1",
        f"--run.out_dir={tmp_path}",
        "--run.name=again",
    )
    assert rc == 0, err[-3000:]
    before, after = load_file(export), load_file(tmp_path / "again" / "model.safetensors")
    frozen = [k for k in before if not k.startswith("fc.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the imported backbone, untouched
    assert not torch.equal(before["fc.weight"], after["fc.weight"])  # the head trained one step from it
    assert (after["fc.weight"] - before["fc.weight"]).abs().max() < 0.05


def test_eval_from_the_safetensors_export_equals_eval_from_the_checkpoint(run, shapes4, tmp_path) -> None:
    common = ["--data", str(shapes4 / "val"), "--workers", "0", "--device", "cpu", "--precision", "fp32"]
    rc, err = cli("eval", "--checkpoint", str(run.paths["last"]), *common, "--out", str(tmp_path / "a"))
    assert rc == 0, err
    rc, err = cli("eval", "--checkpoint", str(run.paths["model_export"]), *common, "--out", str(tmp_path / "b"))
    assert rc == 0, err[-2000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a == b
