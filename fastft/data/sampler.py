"""Which samples each rank loads, in which order, with which augmentation seed: shared by every loader, so the
torchvision, DALI and synthetic loaders see the same batches for a given (seed, epoch, start_batch, rank)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch


def sample_seed(seed: int, epoch: int, index: int, draw: int = 0) -> int:
    """The seed of one training sample's augmentation draws: a function of (run seed, epoch, sample index, draw)
    only, so the draws do not depend on the loader, the worker count, the world size or a resume. `draw` counts the
    earlier draws of the same sample in this epoch's plan (the balanced sampler repeats samples): each repeat gets its
    own crop. Draw 0, the only one a shuffled epoch has, gives the seed as before draws existed. The draw's step is
    odd and spread (Knuth's multiplicative constant) because torch's CPU generator keeps a seed's low 32 bits only:
    distinct draws of one sample differ there."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index + draw * 2_654_435_761


def balanced_plan(labels: Sequence[int], generator: torch.Generator) -> list[int]:
    """len(labels) sample indices drawn with replacement, each sample with probability proportional to
    1 / count(its class): every class present is drawn with probability 1 / (classes present)."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(y) == 0:
        return []
    counts = torch.bincount(y)
    weights = 1.0 / counts[y].double()
    return torch.multinomial(weights, len(y), replacement=True, generator=generator).tolist()


def with_draws(plan: list[int]) -> list[tuple[int, int]]:
    """(index, draw) for each position of a plan: draw = how often the index came earlier in the plan."""
    seen: dict[int, int] = {}
    out = []
    for i in plan:
        d = seen.get(i, 0)
        seen[i] = d + 1
        out.append((i, d))
    return out


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous evaluation shard of `rank` among `n` samples (shards differ by at most one sample). It is also
    how DALI's file reader shards (DALI docs, "Shard calculation"), so both loaders give each rank the same files."""
    return range(rank * n // world, (rank + 1) * n // world)


class ShardedBatchSampler:
    """Batches of (index, epoch) for one rank; (index, epoch, draw) with `labels` (the balanced sampler).

    Training: one global plan per epoch (seeded by seed + epoch, identical on every rank): a permutation, or with
    `labels` n class-balanced draws with replacement (`balanced_plan`; the epoch keeps its length). Rank r takes
    every world-th entry, truncated so all ranks hold the same count, then drops the ragged last batch, so every rank
    runs the same number of steps and the union of one step's batches is a slice of the plan (the same global batch
    as one process with batch_size * world).
    Evaluation: contiguous unpadded shards, no sample duplicated or dropped; the last batch may be short.
    `start_batch` skips batches already trained in this epoch (exact mid-epoch resume).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        labels: Sequence[int] | None = None,
    ) -> None:
        self.n, self.batch_size, self.train, self.seed, self.rank, self.world = n, batch_size, train, seed, rank, world
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} samples")
        self.labels = list(labels) if labels is not None and train else None
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _items(self) -> list:
        """This rank's (index, epoch[, draw]) items of the epoch, before batching."""
        if not self.train:
            return [(i, self.epoch) for i in shard_range(self.n, self.rank, self.world)]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        mine = slice(self.rank, self.rank + self.world * (self.n // self.world), self.world)  # every world-th entry
        if self.labels is None:
            return [(i, self.epoch) for i in torch.randperm(self.n, generator=g).tolist()[mine]]
        # draws are counted over the global plan, so a repeat's number (its augmentation) ignores the world size
        return [(i, self.epoch, d) for i, d in with_draws(balanced_plan(self.labels, g))[mine]]

    def _indices(self) -> list[int]:
        return [item[0] for item in self._items()]

    def __len__(self) -> int:
        if self.train:
            return (self.n // self.world) // self.batch_size
        return math.ceil(len(shard_range(self.n, self.rank, self.world)) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        items = self._items()
        for b in range(self.start_batch, len(self)):
            yield items[b * self.batch_size : (b + 1) * self.batch_size]
