"""`fastft export`: the exported model computes what the trained model computes, in another runtime.

ONNX is run with onnxruntime on batches of other sizes than the export's example (the batch dimension is dynamic);
TorchScript with torch.jit.load; the safetensors export rebuilds through fastft. Tolerance for ONNX: 1e-4 absolute on
logits of order 1 (onnxruntime's CPU kernels sum in another order; measured at most ~2e-6)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_config

pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install 'fastft[export]')")

import onnxruntime as ort

ONNX_ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(shapes4, module_tmp):
    """A one-epoch run per model family: torchvision resnet18 with an MLP head (dropout: eval must turn it off), and
    timm's test_vit."""
    from fastft.train import finetune

    runs = {}
    for name, source, extra in (
        ("resnet18", "torchvision", {"model__head_hidden": 16, "model__head_dropout": 0.5}),
        ("test_vit", "timm", {}),
    ):
        out = module_tmp(f"export-{name}")
        cfg = tiny_config(shapes4, out, optim__epochs=1, model__source=source, model__name=name, **extra)
        finetune(cfg)
        runs[name] = out / "t" / "best.pt"
    return runs


def _reference(checkpoint, x: torch.Tensor) -> torch.Tensor:
    from fastft.api import load_trained

    model, _ = load_trained(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["resnet18", "test_vit"])
def test_onnx_runs_in_onnxruntime_like_the_trained_model(trained, shapes4, tmp_path, name) -> None:
    from fastft.export import export_model

    ckpt = trained[name]
    export_model(ckpt, tmp_path, fmt="onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("images", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # a named, dynamic batch dimension
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec["classes"] == sorted(d.name for d in (shapes4 / "train").iterdir())
    assert spec["transform"]["crop_size"] == 32 and spec["input"]["shape"] == ["batch", 3, 32, 32]
    for batch in (1, 3, 5):  # the export's example had 2
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        want = _reference(ckpt, x)
        assert got.shape == (batch, 4)
        assert (got - want).abs().max().item() < ONNX_ATOL, (batch, (got - want).abs().max().item())


def test_torchscript_and_safetensors_exports_load_back(trained, tmp_path) -> None:
    from fastft.api import load_trained
    from fastft.export import export_model

    ckpt = trained["resnet18"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = _reference(ckpt, x)
    for fmt in ("torchscript", "safetensors"):
        export_model(ckpt, tmp_path / fmt, fmt=fmt)
    scripted = torch.jit.load(str(tmp_path / "torchscript" / "model.torchscript.pt"))
    rebuilt, meta = load_trained(tmp_path / "safetensors" / "model.safetensors", torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), want, atol=1e-6)
        assert torch.equal(rebuilt(x), want)  # the same weights in the same model: bit-identical
    assert meta["model_name"] == "resnet18" and meta["head_hidden"] == 16


def test_export_never_replaces_a_file_unasked_and_bad_input_is_one_line(trained, tmp_path) -> None:
    from fastft.errors import CheckpointError, ConfigError
    from fastft.export import export_model

    ckpt = trained["resnet18"]
    out = tmp_path / "x"
    out.mkdir()
    (out / "preprocess.json").write_text("mine")
    p = run_cli("export", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out))
    refused = f"fastft: error: {out / 'preprocess.json'} exists; pass --overwrite to replace it"
    assert p.returncode == 2 and p.stderr.strip() == refused, p.stderr[-3000:]
    assert (out / "preprocess.json").read_text() == "mine" and not (out / "model.safetensors").exists()
    with pytest.raises(ConfigError, match="--format must be one of onnx, safetensors, torchscript, hf, got 'tflite'"):
        export_model(ckpt, out, fmt="tflite")
    with pytest.raises(ConfigError, match="--format hf: a Hugging Face folder is written for text models"):
        export_model(ckpt, out, fmt="hf")
    with pytest.raises(CheckpointError, match=r"missing\.pt"):
        export_model(tmp_path / "missing.pt", tmp_path / "y")
    export_model(ckpt, out, fmt="safetensors", overwrite=True)
    assert json.loads((out / "preprocess.json").read_text())["model"] == "resnet18"
    assert sorted(f.name for f in out.iterdir()) == ["model.safetensors", "preprocess.json"]  # no temporary left
