"""Early stopping (checkpoint.patience, checkpoint.min_delta): the run ends at the expected epoch, says why in the
log, events.jsonl and metrics.json, keeps its last.pt, and a run resumed after the stop does not train on; on 2
ranks both stop at the same epoch (the job ends instead of hanging in a collective)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_torchrun, tiny_config

from fastft.early_stop import mark, reason


def test_patience_counts_evaluations_since_an_improvement_larger_than_min_delta() -> None:
    best: dict = {"metric": "f1_macro", "value": None, "epoch": None}
    # values by epoch; with min_delta 0.05 only 0.50 -> 0.60 (epoch 3) counts; 0.62 and 0.64 are too small
    for epoch, value in enumerate([0.50, 0.52, 0.60, 0.62, 0.64], start=1):
        prev = best
        if best["value"] is None or value > best["value"]:
            best = {"metric": "f1_macro", "value": value, "epoch": epoch}
        best = {**best, **mark(prev, value, epoch, mode="max", min_delta=0.05)}
    assert (best["mark"], best["improved_epoch"], best["epoch"]) == (0.60, 3, 5)
    assert reason(best, 4, patience=2, min_delta=0.05, eval_every=1) is None
    why = reason(best, 5, patience=2, min_delta=0.05, eval_every=1)
    assert why == "f1_macro did not improve by more than 0.05 in 2 evaluation(s) (patience 2; best 0.6400 at epoch 5)"
    assert reason(best, 5, patience=0, min_delta=0.05, eval_every=1) is None  # off
    assert reason(best, 6, patience=2, min_delta=0.05, eval_every=2) is None  # every 2 epochs: 3 epochs = 1 eval
    # min mode: lower is better; a record saved before early stopping existed (no mark) counts from its best
    old = {"metric": "loss", "value": 1.0, "epoch": 2}
    assert mark(old, 0.99, 3, mode="min", min_delta=0.1) == {"mark": 1.0, "improved_epoch": 2}
    assert mark(old, 0.8, 3, mode="min", min_delta=0.1) == {"mark": 0.8, "improved_epoch": 3}


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_a_run_that_cannot_improve_stops_after_patience_and_stays_stopped(shapes4, tmp_path) -> None:
    from fastft.train import finetune

    # lr 1e-12: the predictions, hence every metric of the report, stay those of epoch 1
    cfg = tiny_config(shapes4, tmp_path, optim__epochs=6, optim__lr=1e-12, checkpoint__patience=2)
    result = finetune(cfg)
    run = tmp_path / "t"
    ev = _events(run)
    assert [e["epoch"] for e in ev if e["event"] == "eval"] == [1, 2, 3]
    (stop,) = [e for e in ev if e["event"] == "early_stop"]
    assert stop["epoch"] == 3 and "in 2 evaluation(s) (patience 2; best" in stop["reason"]
    steps_per_epoch = 48 // 8
    assert result.steps == 3 * steps_per_epoch
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["early_stop"] == {"epoch": 3, "reason": stop["reason"]}
    last = torch.load(run / "last.pt", weights_only=True)
    assert (last["epoch"], last["batch"], last["step"]) == (3, 0, 3 * steps_per_epoch)

    cfg.checkpoint.resume = "auto"
    again = finetune(cfg)  # the same command again (e.g. a requeued job): nothing more to train
    assert again.steps == 3 * steps_per_epoch
    ev = _events(run)
    assert ev[-1]["event"] == "end" and not [e for e in ev[ev.index(stop) + 1 :] if e["event"] == "step"]


@pytest.mark.slow
def test_two_ranks_stop_together(shapes4, tmp_path) -> None:
    args = [
        "train",
        f"--data.root={shapes4}",
        "--model.name=resnet18",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.workers=0",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--optim.epochs=5",
        "--optim.lr=1e-12",
        "--checkpoint.patience=1",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--run.device=cpu",
        f"--run.out_dir={tmp_path}",
        "--run.name=d",
    ]
    p = run_torchrun(2, *args, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "early stop after epoch 2" in p.stderr + p.stdout
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["early_stop"]["epoch"] == 2
    assert [e["epoch"] for e in _events(tmp_path / "d") if e["event"] == "eval"] == [1, 2]
