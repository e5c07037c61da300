"""DALI in the training/evaluation path: same predictions as the torchvision loader, and a 2-process train run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_torchrun, tiny_config

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
pytestmark = pytest.mark.dali


@pytest.fixture(scope="module")
def trained(shapes4, module_tmp):
    from fastft.train import finetune

    out = module_tmp("dali_run")
    return finetune(tiny_config(shapes4, out, optim__epochs=1, model__freeze="until:layer3"))


def test_dali_and_torchvision_eval_agree(trained, shapes4) -> None:
    from fastft.api import load_trained
    from fastft.config import DataConfig
    from fastft.data.index import index_for_eval
    from fastft.data.loaders import build_loader
    from fastft.data.transforms import TransformSpec
    from fastft.parallel.env import DistEnv

    model, meta = load_trained(trained.paths["last"], torch.device("cpu"))
    samples = index_for_eval(shapes4 / "val", meta["classes"])
    spec = TransformSpec.from_dict(meta["transform"])
    logits = {}
    for kind in ("torch", "dali"):
        dl = build_loader(
            samples, spec, DataConfig(loader=kind, workers=1, batch_size=8), train=False, seed=0, env=DistEnv()
        )
        outs, labels = [], []
        with torch.inference_mode():
            for x, y in dl:
                outs.append(model(x))
                labels.append(y)
        logits[kind] = torch.cat(outs)
        assert torch.equal(torch.cat(labels), torch.tensor([y for _, y in samples]))  # one class mapping
    # The resize implementations differ by at most one 8-bit level per pixel; the logits stay within 2e-2.
    diff = (logits["torch"] - logits["dali"]).abs().max().item()
    assert diff < 2e-2, diff
    assert torch.equal(logits["torch"].argmax(1), logits["dali"].argmax(1))


def test_eval_api_with_dali_matches_torch(trained, shapes4) -> None:
    from fastft.api import evaluate

    a = evaluate(trained.paths["last"], shapes4 / "val", loader="torch", workers=1, device="cpu", precision="fp32")
    b = evaluate(trained.paths["last"], shapes4 / "val", loader="dali", workers=1, device="cpu", precision="fp32")
    assert a.metrics["confusion_matrix"] == b.metrics["confusion_matrix"]
    assert b.metrics["loss"] == pytest.approx(a.metrics["loss"], abs=1e-2)


@pytest.mark.slow
def test_train_with_dali_on_two_processes(shapes4, tmp_path) -> None:
    p = run_torchrun(
        2,
        "train",
        f"--data.root={shapes4}",
        "--data.loader=dali",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.batch_size=4",
        "--data.workers=1",
        "--precision.dtype=fp32",
        "--log.progress=false",
        "--run.device=cpu",
        "--optim.epochs=2",
        f"--run.out_dir={tmp_path}",
        "--run.name=d",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    events = [json.loads(x) for x in (tmp_path / "d" / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2 and events[0]["steps_per_epoch"] == 48 // 2 // 4
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["num_samples"] == 24  # every val image once across the 2 DALI shards


@pytest.mark.parametrize("workers", [1, 2])
def test_cpu_training_prefetches_as_far_as_the_torchvision_loader(shapes4, workers) -> None:
    """On the CPU, DALI's training queue holds as many batches as the torchvision loader's workers prefetch (so the
    first epoch's decode overlaps set-up as far with either); evaluation keeps DALI's default queue."""
    from fastft.config import DataConfig
    from fastft.data.index import index_for_eval
    from fastft.data.loaders import build_loader
    from fastft.data.transforms import TransformSpec
    from fastft.parallel.env import DistEnv

    samples = index_for_eval(shapes4 / "train", sorted(p.name for p in (shapes4 / "train").iterdir()))
    made = {}
    for kind in ("torch", "dali"):
        cfg = DataConfig(loader=kind, workers=workers, batch_size=4)
        made[kind] = build_loader(samples, TransformSpec(16, 18), cfg, train=True, seed=0, env=DistEnv())
    torch_loader = made["torch"].loader
    assert made["dali"].prefetch == torch_loader.prefetch_factor * torch_loader.num_workers == 4 * workers
    cfg = DataConfig(loader="dali", workers=workers, batch_size=4)
    assert build_loader(samples, TransformSpec(16, 18), cfg, train=False, seed=0, env=DistEnv()).prefetch == 2
