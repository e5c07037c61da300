"""A rank of tests/test_multilabel.py's exactness check: streams its shard of the scores into a MultilabelEvaluator
(which also tunes per-label thresholds, checked by tests/test_thresholds.py's assert_tuned) and writes the synced
report. Kept apart from the test module so the spawned ranks import only torch and fastft."""

from __future__ import annotations

import json
from pathlib import Path

import torch

N, C = 37, 5  # odd: shards of 19/18 and 13/12/12


def scores() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    targets = (torch.rand(N, C, generator=g) < torch.tensor([0.2, 0.35, 0.5, 0.6, 0.8])).long()
    targets[0] = 0  # a sample with no positive label
    logits = torch.randn(N, C, generator=g) + 1.2 * (2 * targets - 1)  # informative, not separable
    return logits, targets


def streamed(logits: torch.Tensor, targets: torch.Tensor, threshold: float, *, tune: bool = False) -> dict:
    from fastft.evaluation import MultilabelEvaluator

    ev = MultilabelEvaluator(logits.shape[1], torch.device("cpu"), threshold=threshold, tune=tune)
    for start in range(0, len(targets), 5):  # uneven batches: the last one holds the remainder
        ev.update(logits[start : start + 5], targets[start : start + 5].float())
    return ev.compute()


def rank(rank: int, world: int, init: str, out: str) -> None:
    from fastft.data.sampler import shard_range

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        logits, targets = scores()
        shard = shard_range(N, rank, world)
        report = streamed(logits[shard.start : shard.stop], targets[shard.start : shard.stop], 0.5, tune=True)
        Path(f"{out}.{rank}").write_text(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()
