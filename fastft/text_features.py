"""The frozen-feature cache for text models: a linear probe's encoder output (the pooled vector) computed once.

fastft/features.py builds and shares the table exactly as for images (each rank its contiguous shard of rows, one
copy per node, a disk table keyed and checked); this module supplies the rows and the batches:
- TextSource: one rank's shard of a split, in row order, padded per batch (the pooled output does not depend on
  padding: the attention mask hides it);
- the key covers the data file's bytes, the split's rows and labels and the token cache key (tokenizer files,
  max_length) on top of the prefix's weights, precision and storage dtype;
- TextFeatureLoader: batches of pooled features drawn by the text loader's own sampler (LengthBucketSampler), so a
  cached run trains on exactly the batches, in the order, of the uncached one.

Only a probe caches: a cut inside the encoder hands on per-token hidden states of every length, refused in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from fastft.backbones.base import TextSpec
from fastft.data.sampler import shard_range
from fastft.data.text import TextSplit
from fastft.data.text_loader import LengthBucketSampler, TextLoader, pad_batch
from fastft.data.text_tokens import Tokens, tokens_key
from fastft.errors import ConfigError
from fastft.features import FeatureLoader, FeatureTable


class TextSource:
    """The rows of `split` one rank computes features from (its contiguous shard, in order), in batches."""

    views = 0  # text has no augmented views
    seed = 0

    def __init__(self, split: TextSplit, tokens: Tokens, spec: TextSpec, *, rank: int, world: int, batch_size: int):
        self.split, self.tokens, self.spec = split, tokens, spec
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.samples = list(zip(split.rows, split.labels))  # (row, label): the table's rows and labels
        h = hashlib.sha256()
        h.update(f"{split.file.sha256}\0{tokens_key(split.file, spec)}\0".encode())
        h.update(",".join(f"{r}:{y}" for r, y in self.samples).encode())
        self.data_key = h.hexdigest()

    def start(self) -> None:
        """Nothing to start: the tokens are in memory."""

    def close(self) -> None:
        pass

    def example(self, device: torch.device) -> dict[str, torch.Tensor]:
        batch = pad_batch([self.tokens.row(self.split.rows[0])], self.tokens.pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    def batches(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(view 0, token batch) over this rank's shard in row order."""
        shard = shard_range(len(self.split), self.rank, self.world)
        for lo in range(shard.start, shard.stop, self.batch_size):
            rows = [self.split.rows[p] for p in range(lo, min(lo + self.batch_size, shard.stop))]
            yield 0, pad_batch([self.tokens.row(r) for r in rows], self.tokens.pad_id)


class _Pairs:
    """A LengthBucketSampler whose batches read as the image sampler's (position, seed) pairs."""

    def __init__(self, sampler: LengthBucketSampler) -> None:
        self.inner = sampler

    @property
    def train(self) -> bool:
        return self.inner.train

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            yield [(p, 0) for p in batch]


class TextFeatureLoader(FeatureLoader):
    """(pooled features, labels) batches in the order the token loader `like` would give its rows."""

    def __init__(self, table: FeatureTable, like: TextLoader, *, out_dtype: torch.dtype = torch.float32) -> None:
        self.table, self.out_dtype = table, out_dtype
        self.sampler = _Pairs(like.sampler)


def check_probe(prefix) -> None:
    """Refuse a text prefix whose output is not one vector per row (a cut inside the encoder)."""
    from fastft.backbones.hf_text import TextPrefix

    if prefix is None:
        raise ConfigError("features.cache: nothing is frozen before the trainable part, so there is nothing to cache")
    if not (isinstance(prefix, TextPrefix) and prefix.pooler is not None):
        raise ConfigError(
            "features.cache: a text model caches the pooled output of a frozen encoder only (model.freeze=backbone)"
        )
