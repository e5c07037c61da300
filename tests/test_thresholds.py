"""eval.tune_thresholds: per-label thresholds tuned on validation (a brute-force search with scikit-learn's f1_score
over the documented grid; on 3 ranks in tests/test_multilabel.py's rank test), reported beside those at
eval.threshold, saved with the model, and used by predict and eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _multilabel_ranks import N, scores, streamed
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_score, recall_score

from fastft.config import FinetuneConfig
from fastft.errors import ConfigError

GRID = [k / 100 for k in range(1, 100)]  # the documented search grid (0.01 steps), restated here


def brute_force(y: np.ndarray, probs: np.ndarray, fallback: float) -> list[float]:
    """Each label's lowest grid threshold of best F1 (a label predicted above it, compared in float32 as the
    metrics do); `fallback` when that F1 is 0."""
    out = []
    for i in range(y.shape[1]):
        # one column per grid threshold: f1_score(average=None) scores each column as its own binary task
        above = (probs[:, i, None] > np.asarray(GRID, dtype=np.float32)).astype(int)
        f1s = f1_score(np.repeat(y[:, i, None], len(GRID), 1), above, average=None, zero_division=0)
        best = int(np.argmax(f1s))  # the first of the maxima: the lowest threshold
        out.append(GRID[best] if f1s[best] > 0 else fallback)
    return out


def assert_tuned(report: dict, y: np.ndarray, probs: np.ndarray, fallback: float) -> list[float]:
    want = brute_force(y, probs, fallback)
    assert report["tuned/thresholds"] == want
    pred = (probs > np.asarray(want, dtype=np.float32)).astype(int)
    expect = {"tuned/subset_accuracy": accuracy_score(y, pred), "tuned/hamming_loss": hamming_loss(y, pred)}
    for avg in ("macro", "micro"):
        expect[f"tuned/f1_{avg}"] = f1_score(y, pred, average=avg, zero_division=0)
        expect[f"tuned/precision_{avg}"] = precision_score(y, pred, average=avg, zero_division=0)
        expect[f"tuned/recall_{avg}"] = recall_score(y, pred, average=avg, zero_division=0)
    assert {k: report[k] for k in expect} == pytest.approx(expect, abs=1e-6)
    per = f1_score(y, pred, average=None, zero_division=0)
    assert report["tuned/f1_per_class"] == pytest.approx(per.tolist(), abs=1e-6)
    return want


def test_the_tuned_thresholds_are_a_brute_force_f1_search_over_the_grid() -> None:
    """37 samples (odd), the 5 labels of the rank test plus one with no positive (which keeps eval.threshold)."""
    logits, targets = scores()
    g = torch.Generator().manual_seed(5)
    logits = torch.cat([logits, torch.randn(N, 1, generator=g)], 1)
    targets = torch.cat([targets, torch.zeros(N, 1, dtype=torch.long)], 1)
    report = streamed(logits, targets, 0.4, tune=True)
    y, probs = targets.numpy(), logits.float().sigmoid().numpy()
    want = assert_tuned(report, y, probs, fallback=0.4)
    assert want[-1] == 0.4 and len(set(want[:-1])) > 1  # no positive: eval.threshold; the others differ
    assert report["tuned/f1_macro"] >= report["f1_macro"]  # (0.4 is on the grid)
    assert "optimistic" in report["tuned/note"]


def test_ties_take_the_lowest_threshold_and_the_key_is_multilabel_only() -> None:
    from fastft.thresholds import tune

    # label 0: F1 = 1 for every threshold in [0.2, 0.6); label 1: never positive
    probs, target = torch.tensor([[0.2, 0.9], [0.6, 0.1]]), torch.tensor([[0, 0], [1, 0]])
    assert tune(probs, target, fallback=0.5) == [0.2, 0.5]
    # probabilities on the grid values themselves (p > t is false at p == t), 41 samples x 4 labels
    rng = np.random.default_rng(3)
    y = (rng.random((41, 4)) < [0.2, 0.4, 0.5, 0.7]).astype(int)
    p = np.clip(rng.normal(0.5, 0.25, (41, 4)) + 0.2 * (2 * y - 1), 0.0, 1.0).astype(np.float32)
    snap = rng.random((41, 4)) < 0.5
    p[snap] = np.asarray(GRID, dtype=np.float32)[rng.integers(0, len(GRID), snap.sum())]
    assert tune(torch.from_numpy(p), torch.from_numpy(y), fallback=0.5) == brute_force(y, p, 0.5)
    cfg = FinetuneConfig()
    cfg.eval.tune_thresholds = True
    with pytest.raises(ConfigError, match=r"^eval.tune_thresholds: only with data.task = multilabel"):
        cfg.validate()


# ---------------------------------------------------------------------------------------------------------------
# a run: reported, saved with the model, used by predict and eval


def _run_cfg(train: Path, val: Path, out: Path) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.data.task, cfg.data.train_list, cfg.data.val_list = "multilabel", str(train), str(val)
    cfg.data.image_size, cfg.data.batch_size, cfg.data.workers, cfg.data.augment = 32, 8, 0, False
    cfg.model.name, cfg.model.weights, cfg.precision.dtype, cfg.compile.target = "resnet18", "none", "fp32", "none"
    cfg.optim.epochs, cfg.optim.lr, cfg.log.progress, cfg.log.tensorboard = 2, 0.3, False, False
    cfg.run.device, cfg.run.out_dir, cfg.run.name = "cpu", str(out), "tuned"
    cfg.eval.tune_thresholds = True
    cfg.checkpoint.best_metric = "tuned/f1_macro"  # the best checkpoint by the macro F1 at the tuned thresholds
    return cfg


@pytest.fixture(scope="module")
def tuned_run(module_tmp) -> dict:
    """2 epochs, 32 train / 21 val images of tests/test_multilabel.py's coloured squares."""
    from test_multilabel import make_set

    from fastft.train import finetune

    root = module_tmp("thresholds")
    train, val = make_set(root / "train", 32, seed=0), make_set(root / "val", 21, seed=1)
    finetune(_run_cfg(train, val, root / "runs").validate())
    return {"run": root / "runs" / "tuned", "train": train, "val": val}


def test_a_run_reports_and_saves_its_tuned_thresholds(tuned_run) -> None:
    from fastft.checkpoint import load_checkpoint
    from fastft.export import export_model
    from fastft.report import format_table

    run = tuned_run["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = metrics["tuned/thresholds"]
    assert len(chosen) == 3 and all(t in GRID for t in chosen) and "optimistic" in metrics["tuned/note"]
    assert metrics["threshold"] == 0.5 and "f1_macro" in metrics  # the metrics at eval.threshold stay beside them
    assert load_checkpoint(run / "last.pt")["meta"]["thresholds"] == chosen  # the last evaluation's: the kept model
    assert json.loads((run / "model.safetensors").with_suffix(".json").read_text())["thresholds"] == chosen
    export_model(run / "last.pt", run / "export", fmt="safetensors")
    spec = json.loads((run / "export" / "preprocess.json").read_text())
    assert spec["thresholds"] == chosen and "its own threshold" in spec["output"]["meaning"]
    table = format_table(metrics)  # what the run prints at its end
    assert "at per-label thresholds, tuned per label on this validation set (optimistic" in table
    assert f"  f1_macro             {metrics['f1_macro']:.4f}   tuned {metrics['tuned/f1_macro']:.4f}" in table
    page = (run / "report.html").read_text()
    section = page.split("<h2>Per-label thresholds</h2>", 1)[1]
    assert section.startswith("<p>tuned per label on this validation set (optimistic")
    assert f"<tr><td>f1_macro</td><td>{metrics['f1_macro']:.4f}</td><td>{metrics['tuned/f1_macro']:.4f}</td>" in page
    for name, t in zip(metrics["classes"], chosen):
        assert f"<tr><td>{name}</td><td>{t:g}</td>" in section


def test_the_best_checkpoint_is_kept_by_a_tuned_metric(tuned_run) -> None:
    from fastft.checkpoint import load_checkpoint

    run = tuned_run["run"]
    evals = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"eval"' in x]
    tuned = [e["tuned/f1_macro"] for e in evals if e["event"] == "eval"]
    assert len(tuned) == 2
    best = load_checkpoint(run / "best.pt")["best"]
    want = {"metric": "tuned/f1_macro", "value": max(tuned), "epoch": tuned.index(max(tuned)) + 1}
    assert {k: best[k] for k in want} == want


@pytest.mark.parametrize(
    ("key", "tuned", "ok"),
    [
        ("tuned/f1_macro", True, True),
        ("ema/tuned/hamming_loss", True, True),
        ("tuned/f1_macro", False, False),  # no tuned metrics without eval.tune_thresholds
        ("tuned/map", True, False),  # mAP does not depend on a threshold: there is no tuned one
    ],
)
def test_a_tuned_best_metric_needs_tuning_and_a_threshold_metric(key, tuned, ok) -> None:
    from fastft.errors import ConfigError
    from fastft.preflight import check_best_metric

    if ok:
        check_best_metric(key, 3, task="multilabel", tuned=tuned)
        return
    with pytest.raises(ConfigError, match="is not a report key of a 3-label multilabel task"):
        check_best_metric(key, 3, task="multilabel", tuned=tuned)


def test_predict_and_eval_use_the_saved_thresholds(tuned_run, tmp_path) -> None:
    from fastft.api import evaluate, predict

    run, val = tuned_run["run"], tuned_run["val"]
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = metrics["tuned/thresholds"]
    out = predict(run / "last.pt", val.parent, tmp_path / "preds.csv", device="cpu", workers=0)
    rows = list(csv.reader(open(out)))[1:]
    names = metrics["classes"]
    for r in rows:  # each label above its own saved threshold (the probabilities are printed with 6 decimals)
        assert set(filter(None, r[1].split(";"))) == {c for c, t, p in zip(names, chosen, r[2:]) if float(p) > t}
    truth = {str(val.parent / r["path"]): set(filter(None, r["labels"].split(";"))) for r in csv.DictReader(open(val))}
    exact = sum(set(filter(None, r[1].split(";"))) == truth[r[0]] for r in rows) / len(truth)
    assert exact == pytest.approx(metrics["tuned/subset_accuracy"], abs=1e-6)
    report = evaluate(run / "last.pt", val, device="cpu", workers=0, precision="fp32").metrics
    assert report["tuned/thresholds"] == chosen and "saved with the model" in report["tuned/note"]
    keys = ("tuned/f1_macro", "tuned/subset_accuracy", "tuned/hamming_loss", "f1_macro")
    assert {k: report[k] for k in keys} == pytest.approx({k: metrics[k] for k in keys}, abs=1e-6)


def test_a_resumed_run_saves_its_checkpoints_thresholds_until_it_evaluates(tuned_run, tmp_path, monkeypatch) -> None:
    import shutil

    from conftest import run_interrupted

    from fastft.checkpoint import load_checkpoint

    shutil.copytree(tuned_run["run"], tmp_path / "tuned")
    saved = load_checkpoint(tmp_path / "tuned" / "last.pt")
    cfg = _run_cfg(tuned_run["train"], tuned_run["val"], tmp_path)
    cfg.optim.epochs, cfg.checkpoint.every_steps, cfg.checkpoint.resume = 3, 1, "auto"
    run_interrupted(cfg.validate(), monkeypatch, at_step=2)  # last.pt saved after epoch 3's first step, then a crash
    mid = load_checkpoint(tmp_path / "tuned" / "last.pt")
    assert (mid["epoch"], mid["batch"], mid["step"]) == (2, 1, saved["step"] + 1)  # a new save, before any evaluation
    assert mid["meta"]["thresholds"] == saved["meta"]["thresholds"]
