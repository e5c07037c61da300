"""data.task = multilabel with the run's other parts: an EMA of the weights (with per-label thresholds), the disk
feature cache, gradual unfreezing (from the disk cache's table), and (behind slow) DeepSpeed on 2 ranks. One live EMA
run is the reference: its raw weights train exactly as a run without an EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_multilabel import make_set

from fastft.config import FinetuneConfig

KEYS = ("loss", "map", "f1_macro", "f1_micro", "subset_accuracy", "hamming_loss")


def _cfg(data: dict, out: Path, name: str, **keys) -> FinetuneConfig:
    """2 epochs of a linear head on a frozen random resnet18 at 32 px (32 train / 21 val images, batch 8)."""
    cfg = FinetuneConfig()
    cfg.data.task, cfg.data.train_list, cfg.data.val_list = "multilabel", str(data["train"]), str(data["val"])
    cfg.data.image_size, cfg.data.batch_size, cfg.data.workers, cfg.data.augment = 32, 8, 0, False
    cfg.model.name, cfg.model.weights, cfg.precision.dtype, cfg.compile.target = "resnet18", "none", "fp32", "none"
    cfg.optim.epochs, cfg.optim.lr, cfg.log.progress, cfg.log.tensorboard = 2, 0.3, False, False
    cfg.run.device, cfg.run.out_dir, cfg.run.name = "cpu", str(out), name
    for dotted, v in keys.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, v)
    return cfg.validate()


def _run(data: dict, out: Path, name: str, **keys) -> Path:
    from fastft.train import finetune

    finetune(_cfg(data, out, name, **keys))
    return out / name


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _evals(run: Path) -> list[dict]:
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "eval"]


@pytest.fixture(scope="module")
def data(module_tmp) -> dict:
    root = module_tmp("multilabel_runs")
    return {"train": make_set(root / "train", 32, seed=0), "val": make_set(root / "val", 21, seed=1), "root": root}


@pytest.fixture(scope="module")
def ema_run(data) -> Path:
    """Live, with an EMA (decay 0.5: far from the raw weights after 8 steps) that the run keeps, and thresholds."""
    return _run(
        data,
        data["root"] / "runs",
        "ema",
        optim__ema_decay=0.5,
        checkpoint__best_metric="ema/f1_macro",
        eval__tune_thresholds=True,
    )


def test_an_ema_run_evaluates_and_keeps_the_ema_weights_and_their_thresholds(ema_run, data, tmp_path) -> None:
    from fastft.api import evaluate
    from fastft.checkpoint import load_checkpoint

    metrics = _metrics(ema_run)
    assert metrics["ema/loss"] != pytest.approx(metrics["loss"], abs=1e-3)  # the two models differ
    # evaluate() of the checkpoint gives the EMA weights (the kept ones): the run's ema/ metrics
    report = evaluate(ema_run / "last.pt", data["val"], device="cpu", workers=0, precision="fp32").metrics
    assert {k: report[k] for k in KEYS} == pytest.approx({k: metrics[f"ema/{k}"] for k in KEYS}, abs=1e-6)
    # the thresholds saved with it are the EMA model's, and eval reports at them what the run tuned for the EMA
    ema_thresholds = metrics["ema/tuned/thresholds"]
    assert load_checkpoint(ema_run / "last.pt")["meta"]["thresholds"] == ema_thresholds
    assert json.loads((ema_run / "model.json").read_text())["thresholds"] == ema_thresholds
    assert report["tuned/thresholds"] == ema_thresholds
    tuned = ("tuned/f1_macro", "tuned/subset_accuracy", "tuned/hamming_loss")
    assert {k: report[k] for k in tuned} == pytest.approx({k: metrics[f"ema/{k}"] for k in tuned}, abs=1e-6)


@pytest.fixture(scope="module")
def disk_cache(data) -> dict:
    """The features.* keys of a disk-cached run (its folder is the module's)."""
    return {"features__cache": "disk", "features__dtype": "fp32", "features__dir": str(data["root"] / "cache")}


def test_the_disk_cache_trains_the_live_run(ema_run, data, disk_cache, caplog) -> None:
    """The disk cache's run (multi-hot targets beside the cached features) = the live run's raw model."""
    with caplog.at_level("INFO", logger="fastft"):
        built = _metrics(_run(data, data["root"] / "runs", "built", **disk_cache))
    assert "feature cache (disk, fp32): train built, val built" in caplog.text
    live = _metrics(ema_run)
    assert {k: built[k] for k in KEYS} == pytest.approx({k: live[k] for k in KEYS}, abs=1e-4)


def test_an_unfreeze_trains_the_layer_only_from_its_epoch(ema_run, data, disk_cache, tmp_path, caplog) -> None:
    """optim.unfreeze = 2:layer4 on the disk cache: epoch 1 reads the table back from disk and is the live run's
    (layer4 untouched); then the cache is dropped and layer4 trains."""
    from fastft.api import load_trained

    with caplog.at_level("INFO", logger="fastft"):
        run = _run(data, tmp_path, "unfreeze", optim__unfreeze=["2:layer4"], **disk_cache)
    assert "feature cache (disk, fp32): train disk, val disk" in caplog.text
    first, live = _evals(run), _evals(ema_run)
    assert {k: first[0][k] for k in KEYS} == pytest.approx({k: live[0][k] for k in KEYS}, abs=1e-4)
    assert first[1]["loss"] != pytest.approx(live[1]["loss"], abs=1e-3)
    model, _ = load_trained(run / "last.pt", torch.device("cpu"))
    frozen, _ = load_trained(ema_run / "last.pt", torch.device("cpu"))  # layer4 frozen all along: its initial weights
    moved = [n for n, p in model.layer4.named_parameters() if not torch.equal(p, frozen.layer4.get_parameter(n))]
    assert len(moved) == len(list(model.layer4.parameters()))  # every layer4 tensor trained in epoch 2
    unchanged = [n for n, p in model.layer3.named_parameters() if torch.equal(p, frozen.layer3.get_parameter(n))]
    assert len(unchanged) == len(list(model.layer3.parameters()))  # what stays frozen is untouched


@pytest.mark.slow  # a 2-rank torchrun with DeepSpeed's start-up
@pytest.mark.deepspeed
def test_deepspeed_on_two_ranks_trains_the_one_process_run(ema_run, data, tmp_path) -> None:
    """2 ranks x batch 4 under DeepSpeed (ZeRO 1, fp32) = the one-process live run at batch 8 (its raw model)."""
    pytest.importorskip("deepspeed")
    from conftest import run_torchrun

    args = [
        "train",
        "--data.task=multilabel",
        f"--data.train_list={data['train']}",
        f"--data.val_list={data['val']}",
        "--model.name=resnet18",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.workers=0",
        "--data.augment=false",
        "--data.batch_size=4",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--optim.epochs=2",
        "--optim.lr=0.3",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--run.device=cpu",
        "--parallel.backend=deepspeed",
        "--parallel.zero_stage=1",
        f"--run.out_dir={tmp_path}",
        "--run.name=ds",
    ]
    p = run_torchrun(2, *args, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ds, live = _metrics(tmp_path / "ds"), _metrics(ema_run)
    assert {k: ds[k] for k in KEYS} == pytest.approx({k: live[k] for k in KEYS}, abs=1e-5)
