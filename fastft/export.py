"""`fastft export`: a trained model in a format other runtimes load, with its preprocessing beside it.

- onnx: `torch.onnx.export(..., dynamo=True)` with a dynamic batch dimension (input `images`, N x 3 x H x W float32,
  already resized, cropped and normalised as `preprocess.json` says; output `logits`, N x classes). Needs the
  `[export]` extra (onnx, onnxscript; onnxruntime to run it).
- safetensors: the full model's weights with fastft's metadata, as a run's `model.safetensors`.
- torchscript: `torch.jit.trace` on a fixed-size example (torch marks TorchScript deprecated; kept for runtimes that
  still load it).
- hf (text models only): `save_pretrained` of the trained classifier and its tokenizer; the folder loads with
  `AutoModelForSequenceClassification` / `AutoTokenizer` `from_pretrained`.
- onnx of a text model: inputs `input_ids` and `attention_mask` (int64, batch x sequence, both dimensions dynamic, as
  the model's tokenizer pads a batch), output `logits`; the tokenizer (`tokenizer.json`, `save_pretrained`) and
  `preprocess.json` (inputs, max_length, classes) beside it.

Every file is written under a temporary name and renamed into place; an existing file is replaced only with
`overwrite`, so a folder written before is never lost by accident.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from fastft.errors import ConfigError

FORMATS = ("onnx", "safetensors", "torchscript", "hf")
FILE_NAMES = {"onnx": "model.onnx", "safetensors": "model.safetensors", "torchscript": "model.torchscript.pt"}
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")  # what save_pretrained writes that must be new
TEXT_ONNX_FILES = ("model.onnx", "tokenizer.json", "preprocess.json")
INPUT, OUTPUT = "images", "logits"
TEXT_INPUTS = ("input_ids", "attention_mask")


def preprocess_spec(meta: dict) -> dict:
    """What a caller must do to an image before the exported model: the run's eval transform, and the class names."""
    t = meta["transform"]
    return {
        "model": meta["model_name"],
        "source": meta.get("source", "torchvision"),
        "input": {
            "name": INPUT,
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", 3, t["crop_size"], t["crop_size"]],
        },
        "output": {
            "name": OUTPUT,
            "shape": ["batch", meta["num_classes"]],
            "meaning": "logits (softmax for probabilities)",
        },
        "transform": t,
        "classes": meta["classes"],
    } | _multilabel_output(meta)


def _multilabel_output(meta: dict) -> dict:
    """A multilabel model (data.task): a sigmoid per label, and the threshold its run evaluated at."""
    if meta.get("task") != "multilabel":
        return {}
    above = f"above {meta['threshold']:g}"
    per = meta.get("thresholds")  # eval.tune_thresholds: one per label, in class order, tuned on validation
    if per is not None:
        above = "above its own threshold (thresholds, in class order)"
    meaning = f"logits (a sigmoid per label for probabilities; the run predicted a label {above})"
    shape = ["batch", meta["num_classes"]]
    return {
        "task": "multilabel",
        "threshold": meta["threshold"],
        **({"thresholds": list(per)} if per is not None else {}),
        "output": {"name": OUTPUT, "shape": shape, "meaning": meaning},
    }


def export_model(
    checkpoint: str | Path, out_dir: str | Path, *, fmt: str = "onnx", overwrite: bool = False
) -> list[Path]:
    """Write the model of `checkpoint` (a fastft checkpoint or `model.safetensors`) as `fmt` into `out_dir`, with
    `preprocess.json`. Returns the paths written.

    Raises:
        ConfigError: an unknown format, a file that exists without `overwrite`, a format a text model does not take,
            or a missing extra.
        CheckpointError: the checkpoint cannot be read or does not match its model.
    """
    from fastft.api import load_trained, read_trained

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    state = read_trained(checkpoint)
    if state["meta"].get("source") == "hf":
        return _export_text(checkpoint, state, out, fmt=fmt, overwrite=overwrite)
    if fmt == "hf":
        raise ConfigError("--format hf: a Hugging Face folder is written for text models (model.source=hf) only")
    targets = [out / FILE_NAMES[fmt], out / "preprocess.json"]
    if not overwrite:
        for path in targets:
            if path.exists():
                raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    if fmt == "onnx":
        _require_onnx()
    model, meta = load_trained(checkpoint, torch.device("cpu"))
    model = model.float().eval()
    crop = meta["transform"]["crop_size"]
    example = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    write = {"onnx": _onnx, "safetensors": _safetensors, "torchscript": _torchscript}[fmt]
    written = _write_into(out, targets[0].name, lambda path: write(model, meta, example, path))
    spec = json.dumps(preprocess_spec(meta), indent=2) + "\n"
    written += _write_into(out, targets[1].name, lambda path: path.write_text(spec, encoding="utf-8"))
    return written


def _export_text(checkpoint: str | Path, state: dict, out: Path, *, fmt: str, overwrite: bool) -> list[Path]:
    """A text model as a Hugging Face folder (`save_pretrained` of the trained classifier and its tokenizer), or as
    ONNX on token tensors with its tokenizer beside it."""
    from fastft.text_eval import build_text_model

    if fmt not in ("hf", "onnx"):
        raise ConfigError(f"--format {fmt}: a text model exports as --format hf (a save_pretrained folder) or onnx")
    if not overwrite:
        for name in HF_FILES if fmt == "hf" else TEXT_ONNX_FILES:
            if (out / name).exists():
                raise ConfigError(f"{out / name} exists; pass --overwrite to replace it")
    if fmt == "onnx":
        _require_onnx()
    backbone = build_text_model(state["meta"], state, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        return _write_into(out, "config.json", lambda path: backbone.export(path.parent))
    return _text_onnx(backbone, state["meta"], out)


def _text_onnx(backbone, meta: dict, out: Path) -> list[Path]:
    """model.onnx (token tensors in, logits out), the tokenizer's files, preprocess.json."""
    from fastft.backbones.hf_text import TokenLogits

    model = TokenLogits(backbone.model).float().eval()
    # Two rows of different lengths, padded as the tokenizer pads a batch: the example is 2 x (>= 2) tokens, so the
    # exporter keeps both dimensions symbolic instead of specialising on 1.
    example = backbone.tokenizer(["fastft export example row", "a"], padding=True, return_tensors="pt")
    args = tuple(example[k] for k in TEXT_INPUTS)
    positions = getattr(backbone.hf.config, "max_position_embeddings", None)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1, max=positions)
    dynamic = tuple({0: batch, 1: seq} for _ in TEXT_INPUTS)
    written = _write_into(out, "model.onnx", lambda path: _to_onnx(model, args, path, TEXT_INPUTS, dynamic))
    written += _write_into(out, "tokenizer.json", lambda path: backbone.tokenizer.save_pretrained(path.parent))
    spec = {
        "model": meta["model_name"],
        "source": "hf",
        "inputs": [{"name": k, "dtype": "int64", "shape": ["batch", "sequence"]} for k in TEXT_INPUTS],
        "output": {
            "name": OUTPUT,
            "shape": ["batch", meta["num_classes"]],
            "meaning": "logits (softmax for probabilities)",
        },
        "tokenizer": "tokenizer.json in this folder (AutoTokenizer.from_pretrained of the folder); pad the batch",
        "max_length": meta["transform"]["max_length"],
        "classes": meta["classes"],
    }
    text = json.dumps(spec, indent=2) + "\n"
    return written + _write_into(out, "preprocess.json", lambda path: path.write_text(text, encoding="utf-8"))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the export extra: pip install 'fastft[export]'") from None


def _write_into(out: Path, name: str, write) -> list[Path]:
    """Write `name` (and any file the writer puts beside it: a large ONNX model's external weights, which it
    references by name) in a temporary folder inside `out`, then rename each into place, `name` last."""
    tmp = Path(tempfile.mkdtemp(prefix=".fastft-export-", dir=out))
    try:
        write(tmp / name)
        moved = []
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == name):
            os.replace(f, out / f.name)
            moved.append(out / f.name)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _onnx(model: torch.nn.Module, meta: dict, example: torch.Tensor, path: Path) -> None:
    _to_onnx(model, (example,), path, (INPUT,), ({0: torch.export.Dim("batch", min=1)},))


def _to_onnx(model: torch.nn.Module, args: tuple, path: Path, names: tuple[str, ...], dynamic: tuple) -> None:
    # The exporter prints its progress; a failure still raises (and says why) after the output is swallowed.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            input_names=list(names),
            output_names=[OUTPUT],
            dynamic_shapes=dynamic,
            external_data=False,
        )


def _safetensors(model: torch.nn.Module, meta: dict, example: torch.Tensor, path: Path) -> None:
    from fastft.checkpoint import save_state_with_meta

    save_state_with_meta(model.state_dict(), path, {**meta, "part": "model"})


def _torchscript(model: torch.nn.Module, meta: dict, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the format is asked for by name
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
    traced.save(str(path))
