"""data.task = "multilabel": label-set lists (CSV/JSONL), one-line errors, BCEWithLogits, the Multilabel* metrics
against scikit-learn's on 1, 2 and 3 ranks (odd size), and one CLI run that learns, then eval, predict and resume."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _multilabel_ranks import N, rank, scores, streamed
from conftest import run_cli
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
    precision_score,
    recall_score,
)
from test_thresholds import assert_tuned

from fastft.config import FinetuneConfig
from fastft.data.multilabel import index_multilabel
from fastft.errors import ConfigError, DataError

LABELS = ("blue", "green", "red")  # sorted: the class order fastft gives them
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def make_set(folder: Path, n: int, seed: int) -> Path:
    """n 32 px images on grey; each label (a colour) is present with probability 1/2 as a 16 px square at a random
    place. Writes folder/list.csv (path,labels) and returns it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for i in range(n):
        on = [c for c in LABELS if rng.random() < 0.5]
        img = (np.full((32, 32, 3), 128) + rng.integers(-20, 20, (32, 32, 3))).astype(np.uint8)
        for c in on:
            y, x = rng.integers(0, 16, 2)
            img[y : y + 16, x : x + 16] = COLOURS[c]
        Image.fromarray(img).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{';'.join(on)}")
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    return folder / "list.csv"


def _cfg(train: Path, val: Path | None = None, **data) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.data.task, cfg.data.train_list, cfg.data.val_list = "multilabel", str(train), str(val or "")
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")


# ---------------------------------------------------------------------------------------------------------------
# parsing


def test_a_csv_and_a_jsonl_list_give_the_same_multi_hot_samples(tmp_path) -> None:
    _images(tmp_path, 4)
    (tmp_path / "t.csv").write_text("path,labels\n0.png,cat;dog\n1.png,\n# a comment\n2.png, dog \n3.png,10;2\n")
    rows = [("0.png", ["cat", "dog"]), ("1.png", []), ("2.png", ["dog"]), ("3.png", ["10", 2])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"path": p, "labels": ls}) + "\n" for p, ls in rows))
    for name in ("t.csv", "t.jsonl"):
        index = index_multilabel(_cfg(tmp_path / name, tmp_path / name).data)
        assert index.classes == ["2", "10", "cat", "dog"]  # integers in numeric order, then names
        assert [y for _, y in index.train] == [(0, 0, 1, 1), (0, 0, 0, 0), (0, 0, 0, 1), (1, 1, 0, 0)]
        assert [p for p, _ in index.train] == [str(tmp_path / f"{i}.png") for i in range(4)]


def test_without_a_val_list_a_seeded_fraction_is_held_out(tmp_path) -> None:
    _images(tmp_path, 10)
    (tmp_path / "t.csv").write_text("path,labels\n" + "".join(f"{i}.png,a;b\n" for i in range(10)))
    index = index_multilabel(_cfg(tmp_path / "t.csv", val_fraction=0.3).data, seed=3)
    assert (len(index.train), len(index.val)) == (7, 3)
    assert sorted(p for p, _ in index.train + index.val) == sorted(str(tmp_path / f"{i}.png") for i in range(10))
    assert index_multilabel(_cfg(tmp_path / "t.csv", val_fraction=0.3).data, seed=3).val == index.val


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("h.csv", "file,tags\n0.png,a\n", "h.csv:1: expected the header path,labels"),
        ("cols.csv", "path,labels\n0.png,a\n0.png,a,b\n", "cols.csv:3: expected path,labels"),
        ("gone.csv", "path,labels\n0.png,a\nmissing.png,a\n", "gone.csv:3: image not found"),
        ("empty.csv", "path,labels\n0.png,a;;b\n", "empty.csv:2: empty label in 'a;;b'"),
        ("j.jsonl", '{"path": "0.png", "labels": ["a"]}\n{"path": "0.png"}\n', "j.jsonl:2: expected {"),
        ("k.jsonl", '{"path": "0.png", "labels": ["a"]}\nnot json\n', "k.jsonl:2: not a JSON object"),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_row(tmp_path, name, text, message) -> None:
    _images(tmp_path, 1)
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as e:
        index_multilabel(_cfg(tmp_path / name).data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_val_label_stops_the_cli_with_one_line(tmp_path) -> None:
    _images(tmp_path, 2)
    (tmp_path / "train.csv").write_text("path,labels\n0.png,a\n1.png,b\n")
    (tmp_path / "val.csv").write_text("path,labels\n0.png,a\n1.png,b;zebra\n")
    p = run_cli(
        "train",
        "--data.task=multilabel",
        f"--data.train_list={tmp_path / 'train.csv'}",
        f"--data.val_list={tmp_path / 'val.csv'}",
        f"--run.out_dir={tmp_path / 'runs'}",
        "--run.device=cpu",
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"fastft: error: {tmp_path / 'val.csv'}:3: label 'zebra' does not occur in the train labels (2 classes)"
    ]
    assert not (tmp_path / "runs").exists()  # refused before the run folder


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optim.loss", "focal"),
        ("optim.class_weights", "balanced"),
        ("optim.label_smoothing", 0.1),
        ("data.sampler", "balanced"),
        ("data.loader", "synthetic"),
        ("head.sweep_lr", [0.1, 0.01]),
        ("augment.mixup_alpha", 0.2),
        ("model.source", "hf"),
    ],
)
def test_what_multilabel_does_not_take_is_refused_in_one_line(key, value) -> None:
    cfg = _cfg(Path("t.csv"))
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}.*not with data.task = multilabel"):
        cfg.validate()
    cfg.data.task = "multiclass"
    if key not in ("model.source", "head.sweep_lr", "augment.mixup_alpha"):  # (those need other keys set too)
        cfg.validate()  # the same value is fine for a single-label run


def test_a_multilabel_run_needs_a_list_and_a_threshold_inside_0_1() -> None:
    cfg = FinetuneConfig()
    cfg.data.task, cfg.data.root = "multilabel", "/data"
    with pytest.raises(ConfigError, match=r"^data[.]train_list: data[.]task = multilabel reads label sets"):
        cfg.validate()
    cfg = _cfg(Path("t.csv"))
    cfg.eval.threshold = 1.0
    with pytest.raises(ConfigError, match=r"^eval.threshold: must be in \(0.0, 1.0\)"):
        cfg.validate()


# ---------------------------------------------------------------------------------------------------------------
# loss and metrics


def test_the_loss_is_torchs_bce_with_logits() -> None:
    from fastft.losses import MultilabelLoss

    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(7, 5, generator=g), (torch.rand(7, 5, generator=g) < 0.4).float()
    expected = torch.nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(MultilabelLoss()(logits, targets), expected)
    # the mean of uneven shards' per-sample terms is the global mean (what DDP's averaged gradients rely on)
    per = MultilabelLoss().per_sample(logits, targets)
    torch.testing.assert_close(torch.cat([per[:3], per[3:]]).mean(), expected)


def _assert_equals_sklearn(report: dict, threshold: float) -> None:
    logits, targets = scores()
    y, probs = targets.numpy(), logits.float().sigmoid().numpy()
    pred = (probs > threshold).astype(int)
    assert 0 < y.sum(0).min() and y.sum(0).max() < N and pred.any(0).all()  # every label has positives and predictions
    want = {"map": average_precision_score(y, probs, average="macro")}
    for avg in ("macro", "micro"):
        want[f"f1_{avg}"] = f1_score(y, pred, average=avg, zero_division=0)
        want[f"precision_{avg}"] = precision_score(y, pred, average=avg, zero_division=0)
        want[f"recall_{avg}"] = recall_score(y, pred, average=avg, zero_division=0)
    want["hamming_loss"] = hamming_loss(y, pred)
    want["subset_accuracy"] = accuracy_score(y, pred)  # on label-indicator rows: the exact-match ratio
    want["loss"] = float(torch.nn.BCEWithLogitsLoss()(logits, targets.float()))
    assert {k: report[k] for k in want} == pytest.approx(want, abs=1e-6)
    assert report["num_samples"] == N
    assert [r["support"] for r in report["per_class"]] == y.sum(0).tolist()
    per_f1 = f1_score(y, pred, average=None, zero_division=0)
    assert [r["f1"] for r in report["per_class"]] == pytest.approx(per_f1.tolist(), abs=1e-6)
    for i, curve in enumerate(report["pr_curve"]["labels"]):  # report.html's curves: every score, every rank's
        precision, recall, _ = precision_recall_curve(y[:, i], probs[:, i])
        np.testing.assert_allclose(curve["precision"], precision, atol=1e-6)
        np.testing.assert_allclose(curve["recall"], recall, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_the_metrics_equal_scikit_learns_on_one_rank(threshold) -> None:
    report = streamed(*scores(), threshold)
    _assert_equals_sklearn(report, threshold)
    assert report["threshold"] == threshold and report["task"] == "multilabel"
    assert math.isclose(report["f1_macro"], streamed(*scores(), 0.5)["f1_macro"]) == (threshold == 0.5)


# 3 ranks (uneven 13/12/12 shards) in the default suite; 2 behind slow: each launch spawns fresh interpreters
@pytest.mark.parametrize("world", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_the_metrics_are_exact_over_ranks(tmp_path, monkeypatch, world) -> None:
    """Each rank streams its contiguous shard of the 37 samples; every rank's synced report is scikit-learn's, and
    so are the per-label thresholds each rank tunes (a brute-force search with f1_score over all 37 samples)."""
    out = tmp_path / "report.json"
    # the spawned ranks import tests/_multilabel_ranks.py (torch and fastft only)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    torch.multiprocessing.spawn(rank, args=(world, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=world)
    logits, targets = scores()
    for r in range(world):
        report = json.loads(Path(f"{out}.{r}").read_text())
        _assert_equals_sklearn(report, 0.5)
        assert_tuned(report, targets.numpy(), logits.sigmoid().numpy(), 0.5)  # eval.tune_thresholds: exact too


# ---------------------------------------------------------------------------------------------------------------
# one run end to end: train (CLI), eval, predict, resume


@pytest.fixture(scope="module")
def trained(module_tmp) -> dict[str, Path]:
    """3 epochs of a linear head on a frozen (random) resnet18 at 32 px, without augmentation: 64 train and 37 val
    images."""
    root = module_tmp("multilabel")
    train, val = make_set(root / "train", 64, seed=0), make_set(root / "val", 37, seed=1)
    p = run_cli(*_train_args(train, val), "--data.batch_size=8", f"--run.out_dir={root / 'runs'}", "--run.name=ml")
    assert p.returncode == 0, p.stderr[-3000:]
    return {"run": root / "runs" / "ml", "train": train, "val": val, "stdout": p.stdout}


def _train_args(train: Path, val: Path) -> list[str]:
    return [
        "train",
        "--data.task=multilabel",
        f"--data.train_list={train}",
        f"--data.val_list={val}",
        "--model.name=resnet18",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.workers=0",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--data.augment=false",  # the eval transform: what the feature cache trains on (compared below)
        "--optim.epochs=3",
        "--optim.lr=0.3",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--run.device=cpu",
    ]


def test_a_cli_run_learns_and_reports_the_multilabel_metrics(trained) -> None:
    run = trained["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == list(LABELS) and metrics["num_samples"] == 37
    assert "confusion_matrix" not in metrics and not (run / "confusion_matrix.png").exists()
    evals = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    # above chance: predicting 1/2 everywhere gives loss ln 2, mAP ~ the label frequency (~1/2), exact match 1/8
    assert metrics["loss"] < math.log(2) and metrics["map"] > 0.75
    assert metrics["subset_accuracy"] > 0.3 and metrics["hamming_loss"] < 0.35 and metrics["f1_macro"] > 0.6
    # the printed table and report.html carry them, with the per-label support (positives)
    supports = [sum(lbl in row["labels"].split(";") for row in csv.DictReader(open(trained["val"]))) for lbl in LABELS]
    assert [r["support"] for r in metrics["per_class"]] == supports
    for key in ("map", "subset_accuracy", "hamming_loss", "f1_micro"):
        assert f"  {key:<20} {metrics[key]:.4f}" in trained["stdout"]
    assert "pr_curve" not in metrics  # drawn in report.html only
    page = (run / "report.html").read_text()
    assert "Confusion matrix" not in page and "support = positives per label" in page
    pr = page.split("<h2>Precision-recall</h2>", 1)[1]
    assert pr.startswith("<p>one curve per label: 0 = blue, 1 = green, 2 = red</p><img")
    for row in metrics["per_class"]:
        assert f"<tr><td>{row['class']}</td><td>{row['precision']:.4f}</td>" in page
        assert f"<td>{row['f1']:.4f}</td><td>{row['support']}</td></tr>" in page


def test_eval_and_predict_on_the_checkpoint_agree_with_the_run(trained, tmp_path) -> None:
    from fastft.api import evaluate, predict

    run, val = trained["run"], trained["val"]
    final = json.loads((run / "metrics.json").read_text())
    opts = {"device": "cpu", "workers": 0, "precision": "fp32"}
    report = evaluate(run / "last.pt", val, out_dir=tmp_path / "report", **opts).metrics
    keys = ("map", "f1_macro", "f1_micro", "subset_accuracy", "hamming_loss", "loss")
    assert {k: report[k] for k in keys} == pytest.approx({k: final[k] for k in keys}, abs=1e-6)
    again = evaluate(run / "last.pt", val, out_dir=tmp_path / "report", overwrite=True, **opts).metrics
    assert again["map"] == report["map"]  # its own earlier report (no confusion matrix) is recognised and replaced
    out = predict(run / "last.pt", val.parent, tmp_path / "preds.csv", device="cpu", workers=0)
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["path", "labels", *LABELS]
    truth = {str(val.parent / r["path"]): set(filter(None, r["labels"].split(";"))) for r in csv.DictReader(open(val))}
    assert sorted(r[0] for r in rows[1:]) == sorted(truth)
    for r in rows[1:]:  # the predicted set is the labels whose probability is above eval.threshold (0.5)
        assert set(filter(None, r[1].split(";"))) == {c for c, p in zip(LABELS, r[2:]) if float(p) > 0.5}
    exact = sum(set(filter(None, r[1].split(";"))) == truth[r[0]] for r in rows[1:]) / len(truth)
    assert exact == pytest.approx(final["subset_accuracy"], abs=1e-6)
    with pytest.raises(DataError, match="is a folder; a multilabel model is evaluated on a CSV/JSONL"):
        evaluate(run / "last.pt", val.parent, device="cpu", workers=0)


def _same_run(trained: dict[str, Path], out: Path, name: str) -> FinetuneConfig:
    """The config of the `trained` fixture's CLI run."""
    cfg = _cfg(trained["train"], trained["val"], image_size=32, batch_size=8, workers=0, augment=False)
    cfg.model.name, cfg.model.weights, cfg.precision.dtype, cfg.compile.target = "resnet18", "none", "fp32", "none"
    cfg.optim.epochs, cfg.optim.lr, cfg.log.progress, cfg.log.tensorboard = 3, 0.3, False, False
    cfg.run.device, cfg.run.out_dir, cfg.run.name = "cpu", str(out), name
    return cfg


def test_the_feature_cache_trains_the_same_run_on_multi_hot_targets(trained, tmp_path, caplog) -> None:
    from fastft.train import finetune

    cfg = _same_run(trained, tmp_path, "cached")
    cfg.features.cache, cfg.features.dtype = "memory", "fp32"
    with caplog.at_level("INFO", logger="fastft"):
        result = finetune(cfg.validate())
    assert "feature cache (memory, fp32): train built, val built" in caplog.text
    cached = json.loads((tmp_path / "cached" / "metrics.json").read_text())
    live = json.loads((trained["run"] / "metrics.json").read_text())
    keys = ("loss", "map", "f1_macro", "subset_accuracy", "hamming_loss")
    assert {k: cached[k] for k in keys} == pytest.approx({k: live[k] for k in keys}, abs=1e-4)
    assert result.steps == 3 * 8


@pytest.mark.slow  # a 2-rank torchrun of the whole run
def test_two_ddp_ranks_train_and_evaluate_as_one_process(trained, tmp_path) -> None:
    """2 ranks x batch 4 (the train loss a per-sample mean, the metrics synced): the one-process run's metrics."""
    from conftest import run_torchrun

    args = [*_train_args(trained["train"], trained["val"]), "--data.batch_size=4", f"--run.out_dir={tmp_path}"]
    p = run_torchrun(2, *args, "--run.name=ddp", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    one = json.loads((trained["run"] / "metrics.json").read_text())
    keys = ("loss", "map", "f1_macro", "f1_micro", "subset_accuracy", "hamming_loss", "num_samples")
    assert {k: ddp[k] for k in keys} == pytest.approx({k: one[k] for k in keys}, abs=1e-5)


def test_the_exported_preprocess_spec_says_sigmoid_per_label(trained) -> None:
    from fastft.checkpoint import load_checkpoint
    from fastft.export import preprocess_spec

    spec = preprocess_spec(load_checkpoint(trained["run"] / "last.pt")["meta"])
    assert (spec["task"], spec["threshold"], spec["classes"]) == ("multilabel", 0.5, list(LABELS))
    assert "a sigmoid per label" in spec["output"]["meaning"] and "softmax" not in spec["output"]["meaning"]


def test_a_resume_keeps_the_task_and_refuses_another(trained, tmp_path) -> None:
    from fastft.checkpoint import load_checkpoint
    from fastft.train import finetune

    run = trained["run"]
    assert load_checkpoint(run / "last.pt")["meta"]["task"] == "multilabel"
    cfg = _same_run(trained, run.parent, "ml")
    cfg.checkpoint.resume = str(run / "last.pt")
    cfg.data.task, cfg.data.train_list, cfg.data.val_list = "multiclass", str(tmp_path / "single.csv"), ""
    (tmp_path / "single.csv").write_text("".join(f"{trained['val'].parent / f'{i}.png'},a\n" for i in range(2)))
    with pytest.raises(ConfigError, match=r"saved with data[.]task='multilabel', this run has 'multiclass'"):
        finetune(cfg.validate())
