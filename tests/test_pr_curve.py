"""A binary report's precision-recall curve equals scikit-learn's on the same scores, also when the scores are
streamed over uneven batches and split over 2 or 3 ranks (odd sizes), and report.html draws it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve

from fastft.evaluation import StreamingEvaluator
from fastft.report import write_report

N = 101  # odd: shards of 51/50 and 34/34/33
BATCH = 16


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    labels = (torch.rand(N, generator=g) < 0.3).long()
    logits = torch.randn(N, 2, generator=g)
    logits[:, 1] += 1.2 * labels  # informative but not separable
    return logits, labels


def _expected(logits: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    scores = logits.float().softmax(dim=1)[:, 1].numpy()  # the evaluator's float32 softmax
    precision, recall, _ = precision_recall_curve(labels.numpy(), scores)
    return precision, recall, average_precision_score(labels.numpy(), scores)


def _evaluate(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    ev = StreamingEvaluator(2, torch.device("cpu"))
    for start in range(0, len(labels), BATCH):
        ev.update(logits[start : start + BATCH], labels[start : start + BATCH])
    return ev.compute()


def test_the_streamed_curve_equals_sklearns_and_the_page_draws_it(tmp_path) -> None:
    logits, labels = _data()
    report = _evaluate(logits, labels)
    precision, recall, ap = _expected(logits, labels)
    np.testing.assert_allclose(report["pr_curve"]["precision"], precision, atol=1e-6)
    np.testing.assert_allclose(report["pr_curve"]["recall"], recall, atol=1e-6)
    assert report["average_precision"] == pytest.approx(ap, abs=1e-6)
    report["classes"] = ["negative", "<b>positive</b>"]
    paths = write_report(report, tmp_path)
    assert "pr_curve" not in json.loads(paths["metrics"].read_text())
    text = paths["html"].read_text()
    assert text.count('src="data:image/png;base64,') == 3  # counts, row-normalised, precision-recall
    assert "positive class: &lt;b&gt;positive&lt;/b&gt;" in text


def _rank(rank: int, world: int, init: str, out: str) -> None:
    from fastft.data.sampler import shard_range

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        logits, labels = _data()
        shard = shard_range(N, rank, world)
        report = _evaluate(logits[shard.start : shard.stop], labels[shard.start : shard.stop])
        if rank == 0:
            Path(out).write_text(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # 2 and 3 spawned gloo processes: minutes on a loaded 2-core machine
@pytest.mark.parametrize("world", [2, 3])
def test_the_curve_is_exact_over_ranks(tmp_path, world) -> None:
    """Each rank streams its contiguous shard; the curve gathered at compute time is the one-process curve."""
    out = tmp_path / "report.json"
    # the spawned processes import this file: its folder must be on their path
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    torch.multiprocessing.spawn(_rank, args=(world, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=world)
    report = json.loads(out.read_text())
    precision, recall, ap = _expected(*_data())
    assert report["num_samples"] == N
    np.testing.assert_allclose(report["pr_curve"]["precision"], precision, atol=1e-6)
    np.testing.assert_allclose(report["pr_curve"]["recall"], recall, atol=1e-6)
    assert report["average_precision"] == pytest.approx(ap, abs=1e-6)
