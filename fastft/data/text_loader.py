"""Batches of tokenised text: length-bucketed, rank-dealt, resumable training order; every row once in evaluation;
each batch padded to its longest row (see fastft/data/text.py for the whole text data contract)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fastft.data.sampler import ShardedBatchSampler
from fastft.data.text import TextSplit
from fastft.data.text_tokens import Tokens

CHUNK_BATCHES = 50  # global batches sorted by length together: similar lengths in a batch, still a shuffled order

# --------------------------------------------------------------------------------------------------------------------
# Batches


class LengthBucketSampler:
    """Batches of positions (0..n-1) for one rank; see the module docstring. `set_epoch(epoch, start_batch)` skips
    batches already trained (exact mid-epoch resume), as the image sampler does."""

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        chunk_batches: int = CHUNK_BATCHES,
        labels: list[int] | None = None,
    ) -> None:
        n = len(lengths)
        self.lengths, self.batch_size, self.train = lengths, batch_size, train
        self.seed, self.rank, self.world, self.chunk_batches = seed, rank, world, chunk_batches
        self.epoch = self.start_batch = 0
        # Which rows this rank sees is the image sampler's decision: training, the global batches of one process
        # with batch_size * world (its seeded permutation, or with `labels` its class-balanced draws); evaluation,
        # this rank's shard in one batch.
        if train:
            self.order = ShardedBatchSampler(n, batch_size * world, train=True, seed=seed, labels=labels)
        else:
            self.order = ShardedBatchSampler(n, max(n, 1), train=False, rank=rank, world=world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.train:
            return len(self.order)
        return math.ceil(sum(len(b) for b in self._shard()) / self.batch_size)

    def _shard(self) -> list[list[tuple[int, int]]]:
        self.order.set_epoch(self.epoch)
        return list(self.order)

    def batches(self) -> list[list[int]]:
        by_length = lambda i: self.lengths[i]  # sorted() is stable: ties keep the permutation order
        if not self.train:
            shard = sorted((item[0] for b in self._shard() for item in b), key=by_length)
            return [shard[j : j + self.batch_size] for j in range(0, len(shard), self.batch_size)]
        size = self.batch_size * self.world
        flat = [item[0] for b in self._shard() for item in b]
        chunk = size * self.chunk_batches
        global_batches = []
        for c in range(0, len(flat), chunk):
            part = sorted(flat[c : c + chunk], key=by_length)
            global_batches += [part[j : j + size] for j in range(0, len(part), size)]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 104_729)
        order = torch.randperm(len(global_batches), generator=g).tolist()
        # Interleaved dealing: each rank's share of a length-sorted global batch spans the same lengths.
        return [global_batches[o][self.rank :: self.world] for o in order]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch :]


def pad_batch(rows: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids (B, longest) padded with `pad_id`, attention_mask 1 on real tokens."""
    lengths = torch.tensor([len(r) for r in rows])
    input_ids = torch.nn.utils.rnn.pad_sequence([r.long() for r in rows], batch_first=True, padding_value=pad_id)
    mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    return {"input_ids": input_ids, "attention_mask": mask}


class TextLoader:
    """(batch, labels) over one split: batch = input_ids, attention_mask (B, longest in the batch) and `index`, the
    split positions of its rows (evaluation batches are sorted by length, so predictions map back through it)."""

    def __init__(
        self,
        split: TextSplit,
        tokens: Tokens,
        *,
        train: bool,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        balanced: bool = False,
    ) -> None:
        self.split, self.tokens = split, tokens
        lengths = tokens.lengths
        self.sampler = LengthBucketSampler(
            [lengths[r] for r in split.rows],
            batch_size,
            train=train,
            seed=seed,
            rank=rank,
            world=world,
            labels=list(split.labels) if balanced else None,
        )
        self.labels = torch.tensor(split.labels, dtype=torch.long)

    @property
    def num_samples(self) -> int:
        s = self.sampler
        return len(s) * s.batch_size if s.train else sum(len(b) for b in s.batches())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def start(self, epoch: int, start_batch: int = 0) -> None:
        self.set_epoch(epoch, start_batch)  # nothing to decode ahead: the tokens are in memory

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for positions in self.sampler:
            batch = pad_batch([self.tokens.row(self.split.rows[p]) for p in positions], self.tokens.pad_id)
            index = torch.tensor(positions, dtype=torch.long)
            batch["index"] = index
            yield batch, self.labels[index]
