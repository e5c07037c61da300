"""Which samples each rank loads, in which order, with which augmentation seed: shared by every loader, so the
torchvision, DALI and synthetic loaders see the same batches for a given (seed, epoch, start_batch, rank)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation draws: a function of (run seed, epoch, sample index) only, so
    the draws do not depend on the loader, the worker count, the world size or a resume."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous evaluation shard of `rank` among `n` samples (shards differ by at most one sample). It is also
    how DALI's file reader shards (DALI docs, "Shard calculation"), so both loaders give each rank the same files."""
    return range(rank * n // world, (rank + 1) * n // world)


class ShardedBatchSampler:
    """Batches of (index, epoch) for one rank.

    Training: one permutation per epoch (seeded by seed + epoch, identical on every rank); rank r takes every
    world-th index, truncated so all ranks hold the same count, then drops the ragged last batch, so every rank
    runs the same number of steps and the union of one step's batches is a slice of the permutation (the same
    global batch as one process with batch_size * world).
    Evaluation: contiguous unpadded shards, no sample duplicated or dropped; the last batch may be short.
    `start_batch` skips batches already trained in this epoch (exact mid-epoch resume).
    """

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.train, self.seed, self.rank, self.world = n, batch_size, train, seed, rank, world
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _indices(self) -> list[int]:
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            per_rank = self.n // self.world
            return perm[self.rank :: self.world][:per_rank]
        return list(shard_range(self.n, self.rank, self.world))

    def __len__(self) -> int:
        if self.train:
            return (self.n // self.world) // self.batch_size
        return math.ceil(len(shard_range(self.n, self.rank, self.world)) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        idx = self._indices()
        for b in range(self.start_batch, len(self)):
            yield [(i, self.epoch) for i in idx[b * self.batch_size : (b + 1) * self.batch_size]]
