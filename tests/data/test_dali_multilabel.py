"""data.task = multilabel through the DALI loader (CPU pipeline): the train feed's multi-hot targets are the torchvision
loader's for the same plan (a seek and a resume included); one CLI run with data.loader=dali learns, and is the same
run as through the torchvision loader; its checkpoint's evaluation through DALI equals the torchvision loader's, every
metric, on an odd-sized list on 1 rank and 2 gloo ranks (`fastft eval --loader dali` under torchrun).

The images are 37 px PNGs: resnet18's preset at data.image_size=32 resizes the shorter side to 37 and centre-crops 32,
so neither loader resamples them and both decode and crop the same pixels; the evaluations then agree to float
rounding, and a metric that differs is a sample counted twice, dropped, or given another's target."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, run_torchrun
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
pytestmark = pytest.mark.dali

from fastft.config import DataConfig  # noqa: E402
from fastft.data.multilabel import index_multilabel  # noqa: E402

SIZE = 37  # resnet18's resize at image_size=32 (round(32 * 256 / 224)): no resampling in either loader
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LABELS = ("blue", "green", "red")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def distinct_rows(folder: Path, n: int) -> list:
    """n PNGs whose label sets are the binary digits of their index over 5 labels: every target row is distinct (so
    the targets' order is the samples' order), row 0 empty. Returns the samples index_multilabel gives."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for i in range(n):
        Image.new("RGB", (SIZE + i % 7, SIZE), (8 * i, 100, 50)).save(folder / f"{i}.png")
        lines.append(f"{i}.png," + ";".join(f"l{k}" for k in range(5) if i >> k & 1))
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    return index_multilabel(DataConfig(task="multilabel", train_list=str(folder / "list.csv"), val_fraction=0)).train


def colour_squares(folder: Path, n: int, seed: int) -> Path:
    """n 37 px images on grey; each label (a colour) present with probability 1/2 as a 16 px square. Writes and
    returns folder/list.csv."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for i in range(n):
        on = [c for c in LABELS if rng.random() < 0.5]
        img = (np.full((SIZE, SIZE, 3), 128) + rng.integers(-20, 20, (SIZE, SIZE, 3))).astype(np.uint8)
        for c in on:
            y, x = rng.integers(3, SIZE - 19, 2)  # inside the centre crop
            img[y : y + 16, x : x + 16] = COLOURS[c]
        Image.fromarray(img).save(folder / f"{i}.png")
        lines.append(f"{i}.png,{';'.join(on)}")
    (folder / "list.csv").write_text("\n".join(lines) + "\n")
    return folder / "list.csv"


# ---------------------------------------------------------------------------------------------------------------
# the choice and the train feed


def test_auto_picks_dali_for_a_multilabel_run_only_where_it_would_for_single_label(monkeypatch) -> None:
    """data.loader=auto: DALI on a GPU where it runs (stubbed: the choice reads only the device type and DALI's
    CUDA build), the torchvision loader on the CPU or where DALI cannot run, whatever the task."""
    from fastft.data import loaders
    from fastft.parallel.env import DistEnv

    gpu, cpu = DistEnv(device=torch.device("cuda", 0)), DistEnv(device=torch.device("cpu"))
    for problem, on_gpu in [(None, "dali"), ("NVIDIA DALI is not installed", "torch")]:
        monkeypatch.setattr(loaders, "_dali_problem", lambda p=problem: p)
        for task in ("multiclass", "multilabel"):
            cfg = DataConfig(loader="auto", task=task)
            assert (loaders.resolve_loader(cfg, gpu), loaders.resolve_loader(cfg, cpu)) == (on_gpu, "torch")


def test_train_targets_are_the_torchvision_loaders_for_the_same_plan(tmp_path) -> None:
    """31 samples over 2 shards, batch 3 (5 batches a shard), with augmentation (the feed brings the crops too): each
    batch's targets are the torchvision loader's, float32 (3, 5) multi-hot, through epochs, a seek backwards and
    forwards on one loader, and a fresh loader resumed mid-epoch."""
    from fastft.data.dali_feed import DaliLoader
    from fastft.data.torch_loader import TorchLoader
    from fastft.data.transforms import TransformSpec

    samples = distinct_rows(tmp_path, 31)
    spec = TransformSpec(crop_size=32, resize_size=SIZE, mean=MEAN, std=STD)
    common = {"train": True, "batch_size": 3, "seed": 7}

    def dali(shard: int) -> DaliLoader:
        return DaliLoader(
            samples,
            crop_size=32,
            resize_size=SIZE,
            mean=MEAN,
            std=STD,
            threads=1,
            shard_id=shard,
            num_shards=2,
            **common,
        )

    seen: dict[int, list] = {0: [], 2: []}
    for shard in (0, 1):
        ld, ref = dali(shard), TorchLoader(samples, spec, workers=0, rank=shard, world=2, **common)
        assert len(ld) == len(ref) == 5
        for epoch, start in [(0, 0), (1, 0), (0, 2), (2, 0), (2, 4)]:  # consecutive, backwards, forwards
            ld.set_epoch(epoch, start)
            ref.set_epoch(epoch, start)
            got, want = [y for _, y in ld], [y for _, y in ref]
            assert len(got) == 5 - start and [y.shape for y in got] == [(3, 5)] * (5 - start)
            assert all(y.dtype == torch.float32 for y in got)
            assert torch.equal(torch.cat(got), torch.cat(want)), (shard, epoch, start)
            if start == 0 and epoch in seen:
                seen[epoch] += torch.cat(got).tolist()
        resumed = dali(shard)  # a new loader, as after a restart: epoch 1 from batch 3
        resumed.set_epoch(1, 3)
        ref.set_epoch(1, 3)
        assert torch.equal(torch.cat([y for _, y in resumed]), torch.cat([y for _, y in ref]))
    for rows in seen.values():  # 2 x 15 distinct samples per epoch, reshuffled
        assert len({tuple(r) for r in rows}) == 30
    assert seen[0] != seen[2]


# ---------------------------------------------------------------------------------------------------------------
# one CLI run through DALI, and its checkpoint evaluated through DALI and torchvision


@pytest.fixture(scope="module")
def dali_run(module_tmp) -> dict[str, Path]:
    """`fastft train --data.loader=dali --data.task=multilabel`: 3 epochs of a linear head on a frozen (random)
    resnet18, batch 8, 64 train and 37 val images, without augmentation."""
    root = module_tmp("dali_multilabel")
    train, val = colour_squares(root / "train", 64, seed=0), colour_squares(root / "val", 37, seed=1)
    p = run_cli(
        "train",
        "--data.task=multilabel",
        "--data.loader=dali",
        f"--data.train_list={train}",
        f"--data.val_list={val}",
        "--model.name=resnet18",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.workers=1",
        "--data.batch_size=8",
        "--data.augment=false",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--optim.epochs=3",
        "--optim.lr=0.3",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--run.device=cpu",
        f"--run.out_dir={root / 'runs'}",
        "--run.name=ml",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return {"run": root / "runs" / "ml", "train": train, "val": val}


def test_a_cli_run_with_the_dali_loader_learns_the_label_sets(dali_run) -> None:
    run = dali_run["run"]
    assert 'loader = "dali"' in (run / "config.toml").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["classes"] == list(LABELS) and metrics["num_samples"] == 37
    evals = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2, 3] and evals[-1]["train_loss"] < evals[0]["train_loss"]
    # above chance: 1/2 everywhere gives loss ln 2, mAP ~ the label frequency (~1/2), exact match ~1/8
    assert metrics["loss"] < math.log(2) and metrics["map"] > 0.75
    assert metrics["subset_accuracy"] > 0.3 and metrics["hamming_loss"] < 0.35 and metrics["f1_macro"] > 0.6


@pytest.mark.slow  # a second training run (~10 s on a quiet 2-core host, 25-40 s loaded); the targets test above
# checks the same plan and targets in the default suite
def test_the_dali_run_is_the_torchvision_loaders_run(dali_run, tmp_path) -> None:
    """Without augmentation, on 37 px PNGs, both loaders feed the same pixels (to float rounding) in the same plan: the
    same run through the torchvision loader (in process) has the DALI run's per-epoch train loss and every number of
    its final metrics (measured: 1.8e-7 apart at most)."""
    from fastft.config import FinetuneConfig
    from fastft.train import finetune

    cfg = FinetuneConfig()
    d = cfg.data
    d.task, d.loader, d.train_list, d.val_list = "multilabel", "torch", str(dali_run["train"]), str(dali_run["val"])
    d.image_size, d.workers, d.batch_size, d.augment = 32, 0, 8, False
    cfg.model.name, cfg.model.weights, cfg.precision.dtype, cfg.compile.target = "resnet18", "none", "fp32", "none"
    cfg.optim.epochs, cfg.optim.lr, cfg.log.progress, cfg.log.tensorboard = 3, 0.3, False, False
    cfg.run.device, cfg.run.out_dir, cfg.run.name = "cpu", str(tmp_path), "torch"
    finetune(cfg.validate())

    def run(folder: Path) -> dict[str, float]:
        events = [json.loads(x) for x in (folder / "events.jsonl").read_text().splitlines()]
        losses = {f"train_loss.{e['epoch']}": e["train_loss"] for e in events if e["event"] == "eval"}
        return losses | _numbers(json.loads((folder / "metrics.json").read_text()))

    dali, torch_run = run(dali_run["run"]), run(tmp_path / "torch")
    assert len(dali) > 20 and "train_loss.3" in dali
    assert dali == pytest.approx(torch_run, abs=1e-5)


def _numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """Every number in a report (metrics, per-label rows, PR curves), flattened by key path."""
    out: dict[str, float] = {}
    items = report.items() if isinstance(report, dict) else enumerate(report)
    for k, v in items:
        if isinstance(v, dict | list):
            out |= _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


@pytest.fixture(scope="module")
def torch_eval(dali_run) -> dict[str, float]:
    """The run's checkpoint evaluated on the val list by the torchvision loader, in one process, batches of 6."""
    from fastft.api import evaluate

    opts = {"device": "cpu", "workers": 0, "precision": "fp32", "batch_size": 6}
    return _numbers(evaluate(dali_run["run"] / "last.pt", dali_run["val"], loader="torch", **opts).metrics)


def test_dali_evaluation_equals_the_torchvision_loaders_on_one_rank(dali_run, torch_eval) -> None:
    """37 samples in batches of 6 (the last one short): every number of the report (PR curves included) is the
    torchvision loader's, and the run's own end-of-run evaluation (DALI, batch 8) is too."""
    from fastft.api import evaluate

    want = torch_eval
    got = _numbers(
        evaluate(
            dali_run["run"] / "last.pt",
            dali_run["val"],
            loader="dali",
            device="cpu",
            workers=1,
            precision="fp32",
            batch_size=6,
        ).metrics
    )
    assert want["num_samples"] == 37 and len(want) > 100
    assert got == pytest.approx(want, abs=1e-6)
    in_run = _numbers(json.loads((dali_run["run"] / "metrics.json").read_text()))
    assert {k: in_run[k] for k in want if not k.startswith("pr_curve.")} == pytest.approx(
        {k: v for k, v in want.items() if not k.startswith("pr_curve.")}, abs=1e-6
    )


def test_fastft_eval_with_dali_on_two_ranks_equals_one_torchvision_process(dali_run, torch_eval, tmp_path) -> None:
    """`fastft eval --loader dali` under torchrun (2 gloo ranks: shards of 19 and 18 samples in batches of 6, so one
    rank's last batch is empty and the other's holds 1): metrics.json is the one-process torchvision evaluation's,
    every number, with 37 samples counted once."""
    out = tmp_path / "report"
    p = run_torchrun(
        2,
        "eval",
        f"--checkpoint={dali_run['run'] / 'last.pt'}",
        f"--data={dali_run['val']}",
        "--loader=dali",
        "--device=cpu",
        "--workers=1",
        "--precision=fp32",
        "--batch-size=6",
        f"--out={out}",
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    got = _numbers(json.loads((out / "metrics.json").read_text()))
    want = {k: v for k, v in torch_eval.items() if not k.startswith("pr_curve.")}  # metrics.json leaves them out
    assert got["num_samples"] == 37
    assert got == pytest.approx(want, abs=1e-6)
