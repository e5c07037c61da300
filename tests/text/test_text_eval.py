"""A trained text model (model.source=hf) after its run: `fastft eval`, `fastft predict` and `fastft export --format
hf`, checked against the run's own evaluation and against transformers reading the exported folder by itself."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_torchrun
from safetensors.torch import load_file, save_file
from test_text_train import text_config, write_rows
from tiny_bert import make_tiny_bert

import fastft.api as fastft_api
from fastft.errors import CheckpointError, ConfigError
from fastft.export import export_model
from fastft.train import finetune


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A 3-epoch linear probe of a tiny BERT (a probe checkpoint: the encoder is rebuilt from its folder on load)."""
    root = tmp_path_factory.mktemp("text_eval")
    data = {
        "bert": make_tiny_bert(root / "bert", init_range=0.2),
        "train": write_rows(root / "train.csv", 60, seed=0),
        "val": write_rows(root / "val.csv", 31, seed=1),  # odd: 2 ranks get 16 and 15 rows
    }
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTFT_CACHE", str(root / "cache"))
    try:
        finetune(text_config(data, root / "runs", optim__epochs=3, model__freeze="backbone"))
    finally:
        mp.undo()
    return {**data, "run": root / "runs" / "t", "root": root}


@pytest.fixture(autouse=True)
def _token_cache(trained, monkeypatch) -> None:
    monkeypatch.setenv("FASTFT_CACHE", str(trained["root"] / "cache"))  # never the user's ~/.cache


def test_eval_of_the_checkpoint_equals_the_runs_own_evaluation(trained, tmp_path) -> None:
    run = trained["run"]
    assert set(torch.load(run / "last.pt", weights_only=True)["frozen"]) >= {"blake2b", "weights"}  # a probe ckpt
    # fp32 as the run evaluated (auto may pick bf16 on this CPU)
    fastft_api.evaluate(run / "last.pt", trained["val"], out_dir=tmp_path, precision="fp32", device="cpu")
    got = json.loads((tmp_path / "metrics.json").read_text())
    want = json.loads((run / "metrics.json").read_text())
    assert got["num_samples"] == 31
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["f1_macro"] == pytest.approx(want["f1_macro"], abs=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.slow
def test_eval_on_two_ranks_counts_every_row_once_and_equals_one(trained, tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    ckpt, val = str(trained["run"] / "last.pt"), str(trained["val"])
    fastft_api.evaluate(ckpt, val, out_dir=one, precision="fp32", device="cpu")
    r = run_torchrun(2, "eval", "--checkpoint", ckpt, "--data", val, "--out", str(two), "--precision", "fp32")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert b["num_samples"] == 31
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_predict_and_the_hf_export_agree_with_transformers_reading_the_folder(trained, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["the cat and a dog", "", "red blue", "price of food", "very green bird"]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")  # line 2 is blank: skipped, lines keep their numbers
    out, folder = tmp_path / "pred.csv", tmp_path / "hf"
    ckpt = str(trained["run"] / "best.pt")
    fastft_api.predict(ckpt, src, out, device="cpu")
    export_model(ckpt, folder, fmt="hf")

    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(x["line"]) for x in rows] == [1, 3, 4, 5]
    assert [x["text"] for x in rows] == [t for t in texts if t]

    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        enc = tok([x["text"] for x in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
        probs = model(**enc).logits.softmax(dim=1)
    p, y = probs.max(dim=1)
    assert [x["label"] for x in rows] == [model.config.id2label[i] for i in y.tolist()]
    assert [float(x["probability"]) for x in rows] == pytest.approx(p.tolist(), abs=1e-5)
    assert sorted(model.config.id2label.values()) == ["animal", "colour", "shop"]


def test_onnx_export_runs_in_onnxruntime_like_the_trained_model(trained, tmp_path) -> None:
    """model.onnx takes input_ids + attention_mask with dynamic batch and sequence axes: onnxruntime's logits on
    batches of 1, 4 and 2 rows (each padded to its longest row, by the tokenizer exported beside the model) equal the
    checkpoint's model in PyTorch (1e-4, as for image exports)."""
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed (pip install 'fastft[export]')")
    from transformers import AutoTokenizer

    ckpt = trained["run"] / "best.pt"
    written = export_model(ckpt, tmp_path, fmt="onnx")
    assert {"model.onnx", "tokenizer.json", "preprocess.json"} <= {p.name for p in written}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for i in inputs for d in i.shape)  # both axes named, dynamic
    assert [o.name for o in session.get_outputs()] == ["logits"]
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert (spec["classes"], spec["max_length"]) == (["animal", "colour", "shop"], 16)

    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    model, _ = fastft_api.load_trained(ckpt, torch.device("cpu"))
    texts = ["dog", "the cat and a dog", "red", "price of food", "very green bird and a fish", "blue"]
    lengths = set()
    for rows in (texts[:1], texts[1:5], texts[4:6]):
        enc = tok(rows, padding=True, truncation=True, max_length=16, return_tensors="pt")
        feed = {k: enc[k] for k in ("input_ids", "attention_mask")}
        lengths.add(tuple(feed["input_ids"].shape))
        got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        with torch.no_grad():
            want = model(feed)
        assert got.shape == (len(rows), 3)
        assert (got - want).abs().max().item() < 1e-4, rows
    assert lengths == {(1, 3), (4, 8), (2, 8)}  # other batch sizes and lengths than the export's example (2 x 6)


def test_text_inference_bad_input_is_one_line(trained, tmp_path) -> None:
    run = trained["run"]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nthe cat,animal\nred,weather\n", encoding="utf-8")
    r = run_cli("eval", "--checkpoint", str(run / "last.pt"), "--data", str(bad), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert f"{bad}:3: label 'weather'" in r.stderr

    with pytest.raises(ConfigError, match="--format torchscript: a text model exports as --format hf"):
        export_model(run / "last.pt", tmp_path / "x", fmt="torchscript")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export_model(run / "last.pt", folder, fmt="hf")
    assert (folder / "config.json").read_text() == "{}"  # nothing already there is lost


def test_a_changed_encoder_folder_is_refused_naming_the_checkpoint(trained, tmp_path) -> None:
    """The probe checkpoint rebuilds its frozen encoder from the folder it was trained from: changed weights there
    are refused, not silently evaluated."""
    bert = tmp_path / "bert"
    shutil.copytree(trained["bert"], bert)
    state = torch.load(trained["run"] / "last.pt", weights_only=True)
    state["meta"]["model_name"] = str(bert)
    ckpt = tmp_path / "moved.pt"
    torch.save(state, ckpt)
    weights = load_file(str(bert / "model.safetensors"))
    key = next(k for k in weights if "embeddings.word_embeddings" in k)
    weights[key] = weights[key] + 0.5
    save_file(weights, str(bert / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"^{ckpt}: "):
        fastft_api.evaluate(ckpt, trained["val"], device="cpu")
