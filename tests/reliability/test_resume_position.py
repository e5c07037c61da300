"""The data position inside an epoch is restored on resume: batches from `start_batch` on are exactly the tail of the
epoch's batches, so no sample is trained twice or skipped in that epoch (for every rank of any world size)."""

from __future__ import annotations

import pytest

from fastft.data.loaders import dali_available
from fastft.data.sampler import ShardedBatchSampler
from fastft.data.torch_loader import TorchLoader


def _batches(sampler: ShardedBatchSampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    out = []
    for batch in sampler:
        assert {e for _, e in batch} == {epoch}
        out.append([i for i, _ in batch])
    return out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("epoch", [0, 3])
def test_batches_after_start_batch_are_the_tail_of_the_full_epoch(world, epoch) -> None:
    n, bs = 103, 4  # ragged on purpose: 103 = 2 * 51 + 1 and 51 = 12 * 4 + 3
    for rank in range(world):
        full = _batches(ShardedBatchSampler(n, bs, train=True, seed=5, rank=rank, world=world), epoch)
        assert len(full) == (n // world) // bs
        for start in range(len(full) + 1):
            resumed = _batches(ShardedBatchSampler(n, bs, train=True, seed=5, rank=rank, world=world), epoch, start)
            assert resumed == full[start:], (rank, start)
            # what ran before the kill + what runs after = the uninterrupted epoch, sample for sample
            assert full[:start] + resumed == full


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_trains_each_sample_at_most_once_over_all_ranks(world) -> None:
    n, bs = 103, 4
    seen = [
        i
        for r in range(world)
        for b in _batches(ShardedBatchSampler(n, bs, train=True, seed=5, rank=r, world=world), 1)
        for i in b
    ]
    assert len(seen) == len(set(seen)) == world * ((n // world) // bs) * bs
    # step s of a 2-rank run holds the same samples as step s of one process with twice the batch
    single = _batches(ShardedBatchSampler(n, bs * world, train=True, seed=5), 1)
    per_rank = [_batches(ShardedBatchSampler(n, bs, train=True, seed=5, rank=r, world=world), 1) for r in range(world)]
    for s in range(len(per_rank[0])):
        assert sorted(i for r in range(world) for i in per_rank[r][s]) == sorted(single[s])


def test_the_loader_resumes_at_the_same_files(shapes4) -> None:
    """Through the DataLoader (one worker): the labels of a resumed epoch are the tail of the full epoch's labels.
    Each file gets its own label (its index), so the labels name the files."""
    from fastft.data.transforms import TransformSpec

    files = sorted(str(p) for p in (shapes4 / "train").rglob("*.jpg"))
    samples = [(f, i) for i, f in enumerate(files)]
    spec = TransformSpec(crop_size=16, resize_size=16)

    def labels(start: int) -> list[list[int]]:
        loader = TorchLoader(samples, spec, train=True, batch_size=5, workers=1, seed=2, persistent_workers=False)
        loader.set_epoch(2, start)
        return [y.tolist() for _, y in loader]

    full = labels(0)
    assert len(full) == len(files) // 5
    assert labels(4) == full[4:]


# --------------------------------------------------------------------------------------------------------------------
# DALI


def _dali_labels(samples, epochs: list[tuple[int, int]]) -> list[list[list[int]]]:
    """Iterate one DaliLoader through (epoch, start_batch) pairs; returns the label batches of each."""
    from fastft.data.dali_feed import DaliLoader

    dl = DaliLoader(
        samples,
        train=True,
        augment=False,
        batch_size=3,
        crop_size=16,
        resize_size=16,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        threads=1,
        seed=4,
    )
    out = []
    for epoch, start in epochs:
        dl.set_epoch(epoch, start)
        out.append([y.tolist() for _, y in dl])
    return out


needs_dali = [pytest.mark.dali, pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")]


@pytest.fixture(scope="module")
def dali_samples(shapes4):
    files = sorted(str(p) for p in (shapes4 / "val").rglob("*.jpg"))[:14]
    return [(f, i) for i, f in enumerate(files)]


@pytest.mark.parametrize("epoch", [pytest.param(0, marks=needs_dali), pytest.param(1, marks=needs_dali)])
def test_dali_resumes_at_the_same_samples(dali_samples, epoch) -> None:
    """A fresh DALI loader asked for (epoch, 2) yields the tail of that epoch as an uninterrupted run saw it."""
    reference = _dali_labels(dali_samples, [(e, 0) for e in range(epoch + 1)])[-1]
    assert len(reference) == 14 // 3
    resumed = _dali_labels(dali_samples, [(epoch, 2)])[0]
    assert resumed == reference[2:]
