"""data.sampler = balanced: class-balanced draws with replacement, the same global plan dealt over any number of
ranks, exact mid-epoch resume, the same plan through the feature cache and the DALI feed, and a real run."""

from __future__ import annotations

import math

import pytest
import torch

from fastft.data.sampler import ShardedBatchSampler, sample_seed

IMBALANCED = [0] * 2000 + [1] * 200  # 10:1, 2200 samples


def _epoch(sampler: ShardedBatchSampler, epoch: int, start: int = 0) -> list[list[tuple[int, ...]]]:
    sampler.set_epoch(epoch, start)
    return list(sampler)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_each_class_is_half_of_an_epoch_of_10_to_1_labels(epoch) -> None:
    """2176 draws (68 full batches of 32) with p = 0.5 per class: the binomial sd of a share is sqrt(0.25 / 2176) =
    0.0107, so ±0.03 is 2.8 sd (a correct sampler misses it on about 0.5% of seeds; these seeds are fixed). Shuffled,
    the minority's share is 200 / 2200 = 0.09."""
    sampler = ShardedBatchSampler(2200, 32, train=True, seed=3, labels=IMBALANCED)
    items = [item for batch in _epoch(sampler, epoch) for item in batch]
    assert len(items) == 68 * 32  # the epoch keeps its length
    share = sum(IMBALANCED[item[0]] for item in items) / len(items)
    assert abs(share - 0.5) <= 3 * math.sqrt(0.25 / len(items)) < 0.033
    assert abs(share - 0.5) <= 0.03, share
    # the minority's 200 samples are drawn about 5.4 times each: repeats carry their draw number, so each one gets
    # its own augmentation seed
    drawn = [(item[0], item[2]) for item in items]
    assert len(set(drawn)) == len(drawn)
    assert max(d for _, d in drawn) >= 3
    # distinct where torch's generator looks: its seed's low 32 bits
    assert len({sample_seed(3, epoch, i, d) % 2**32 for i, d in drawn}) == len(drawn)
    assert {item[1] for item in items} == {epoch}


def test_every_class_is_drawn_equally_often_with_four_classes() -> None:
    labels = [0] * 900 + [1] * 90 + [2] * 9 + [3] * 1  # 900:90:9:1; class 3 is a single sample
    sampler = ShardedBatchSampler(len(labels), 50, train=True, seed=0, labels=labels)
    counts = torch.bincount(torch.tensor([labels[i[0]] for b in _epoch(sampler, 0) for i in b]), minlength=4)
    sd = math.sqrt(0.25 * 0.75 * 1000)  # binomial sd of one class's count, p = 1/4, 1000 draws: 13.7
    assert (counts - 250).abs().max() <= 3 * sd, counts.tolist()


def test_shuffle_is_unchanged_without_labels() -> None:
    """No labels: the permutation (index, epoch) pairs of before, each sample at most once."""
    sampler = ShardedBatchSampler(103, 4, train=True, seed=5)
    items = [item for batch in _epoch(sampler, 1) for item in batch]
    g = torch.Generator().manual_seed(5 * 7919 + 1)
    assert items == [(i, 1) for i in torch.randperm(103, generator=g).tolist()[:100]]


@pytest.mark.parametrize("world", [2, 3])
def test_the_ranks_deal_the_one_process_plan(world) -> None:
    """Step s of a `world`-rank run holds the samples (with their draw numbers) of step s of one process with
    batch_size * world, on an odd size; every rank runs the same number of steps."""
    n, bs = 103, 4
    labels = [i % 7 == 0 for i in range(n)]  # 15 of 103
    single = _epoch(ShardedBatchSampler(n, bs * world, train=True, seed=5, labels=labels), 2)
    ranks = [
        _epoch(ShardedBatchSampler(n, bs, train=True, seed=5, rank=r, world=world, labels=labels), 2)
        for r in range(world)
    ]
    assert {len(r) for r in ranks} == {len(single)} == {n // (bs * world)}
    for s in range(len(single)):
        assert sorted(item for r in ranks for item in r[s]) == sorted(single[s])
    # and it is a balanced plan: the 15 samples of class 1 make about half of the draws, not 15%
    drawn = [labels[item[0]] for b in single for item in b]
    assert 0.3 < sum(drawn) / len(drawn) < 0.7


@pytest.mark.parametrize("world", [1, 2])
def test_a_mid_epoch_resume_yields_exactly_the_remaining_batches(world) -> None:
    n, bs = 103, 4
    labels = [int(i < 10) for i in range(n)]
    for rank in range(world):
        full = _epoch(ShardedBatchSampler(n, bs, train=True, seed=5, rank=rank, world=world, labels=labels), 3)
        for start in range(len(full) + 1):
            fresh = ShardedBatchSampler(n, bs, train=True, seed=5, rank=rank, world=world, labels=labels)
            assert _epoch(fresh, 3, start) == full[start:], (rank, start)
    other = _epoch(ShardedBatchSampler(n, bs, train=True, seed=5, labels=labels), 4)
    assert other != _epoch(ShardedBatchSampler(n, bs, train=True, seed=5, labels=labels), 3)  # a plan per epoch


def test_the_feature_cache_reads_the_drawn_rows_and_views() -> None:
    """Cached epochs index the table by the drawn sample indices; a repeat (draw d) reads view (epoch + d) % V."""
    from fastft.features import FeatureLoader, FeatureTable

    n, views = 40, 3
    labels = torch.tensor([int(i < 4) for i in range(n)])
    # row i of view v holds 1000 * v + i: the features name the sample and the view
    part = (torch.arange(n, dtype=torch.float32)[None, :, None] + 1000 * torch.arange(views)[:, None, None]).expand(
        views, n, 2
    )
    table = FeatureTable([part.contiguous()], [0], labels, views, "built")
    loader = FeatureLoader(table, 8, train=True, seed=1, rank=0, world=1, balanced=True)
    loader.set_epoch(2)
    plan = ShardedBatchSampler(n, 8, train=True, seed=1, labels=labels.tolist())
    plan.set_epoch(2)
    for (x, y), batch in zip(loader, plan, strict=True):
        idx = torch.tensor([i for i, _, _ in batch])
        view = torch.tensor([(2 + d) % views for _, _, d in batch])
        assert torch.equal(x[:, 0], (idx + 1000 * view).float())
        assert torch.equal(y, labels[idx])
    assert len(loader) == len(plan) == 5


def test_the_dali_feed_follows_the_plan_and_its_draws() -> None:
    """The DALI training feed takes the sampler's batches with their draw numbers (the crop seeds' input); no DALI
    pipeline is built."""
    from fastft.data.dali_feed import _TrainFeed

    labels = [int(i < 5) for i in range(60)]
    samples = [(f"/nonexistent/{i}.jpg", y) for i, y in enumerate(labels)]
    sampler = ShardedBatchSampler(60, 4, train=True, seed=2, rank=1, world=2, labels=labels)
    feed = _TrainFeed(samples, sampler, 0, 0, crop_seed=2)
    expected = ShardedBatchSampler(60, 4, train=True, seed=2, rank=1, world=2, labels=labels)
    for epoch in (0, 1):
        assert feed._batches(epoch) == [[(i, d) for i, _, d in b] for b in _epoch(expected, epoch)]


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """2 classes, 24 and 4 training images (6:1), 6 validation images each."""
    from fastft.data.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("imbalanced")
    data = make_image_folder(root, num_classes=2, train_per_class=24, val_per_class=6, image_size=32, seed=4)
    for f in sorted(sorted((data / "train").iterdir())[1].iterdir())[4:]:
        f.unlink()
    return data


@pytest.mark.slow  # a CLI subprocess: ~50 s on a loaded 2-core machine; the in-process cached run below stays
def test_a_cli_run_trains_with_the_balanced_sampler(imbalanced, tmp_path) -> None:
    import json

    from conftest import run_cli

    p = run_cli(
        "train",
        *("--model.weights=none", "--data.image_size=32", "--data.batch_size=8", "--data.workers=0"),
        *("--precision.dtype=fp32", "--log.progress=false", "--run.device=cpu", "--optim.epochs=1"),
        *(f"--data.root={imbalanced}", f"--run.out_dir={tmp_path}", "--run.name=b", "--data.sampler=balanced"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["num_samples"] == 12
    assert 'sampler = "balanced"' in (tmp_path / "b" / "config.toml").read_text()


def test_a_feature_cache_run_trains_with_the_balanced_sampler(imbalanced, tmp_path, monkeypatch) -> None:
    """The cached training batches are class-balanced: the 4 rare samples of 28 make about half of the 24 draws
    (a permutation would give at most 4 of 24)."""
    from conftest import tiny_config

    from fastft.features import FeatureLoader
    from fastft.train import finetune

    trained: list[int] = []
    plain_iter = FeatureLoader.__iter__

    def recording(self):
        for x, y in plain_iter(self):
            if self.sampler.train:
                trained.extend(y.tolist())
            yield x, y

    monkeypatch.setattr(FeatureLoader, "__iter__", recording)
    cfg = tiny_config(imbalanced, tmp_path, optim__epochs=1, data__sampler="balanced", features__cache="memory")
    result = finetune(cfg)
    assert result.metrics["num_samples"] == 12 and len(result.metrics["classes"]) == 2
    assert len(trained) == 24  # 3 batches of 8: the epoch keeps its length
    assert sum(trained) / len(trained) > 0.3, trained  # Binomial(24, 0.5) sd 0.10; a permutation: <= 0.167


def test_an_unknown_sampler_is_a_one_line_config_error(imbalanced, tmp_path) -> None:
    from conftest import tiny_config

    from fastft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.sampler.*oversample"):
        tiny_config(imbalanced, tmp_path, data__sampler="oversample")


def test_the_torch_synthetic_and_text_loaders_take_the_plan(shapes4) -> None:
    """The torchvision loader yields the planned samples' labels, and its augmentation seed follows the draw (two
    draws of one file differ); the synthetic loader's labels follow the plan; the text sampler buckets the drawn
    rows."""
    from fastft.data.loaders import SyntheticLoader
    from fastft.data.text_loader import LengthBucketSampler
    from fastft.data.torch_loader import ImageDataset, TorchLoader
    from fastft.data.transforms import TransformSpec

    files = sorted(str(p) for p in (shapes4 / "train").rglob("*.jpg"))  # 48 files
    samples = [(f, int(i < 6)) for i, f in enumerate(files)]  # 6 of class 1
    labels = [y for _, y in samples]
    spec = TransformSpec(crop_size=16, resize_size=16)
    plan = ShardedBatchSampler(48, 8, train=True, seed=3, labels=labels)
    plan.set_epoch(1)
    want = [torch.tensor([labels[it[0]] for it in b]) for b in plan]
    loader = TorchLoader(samples, spec, train=True, batch_size=8, workers=0, seed=3, balanced=True)
    loader.set_epoch(1)
    assert all(torch.equal(y, w) for (_, y), w in zip(loader, want, strict=True))
    synthetic = SyntheticLoader(samples, spec, batch_size=8, train=True, seed=3, rank=0, world=1, balanced=True)
    synthetic.set_epoch(1)
    assert all(torch.equal(y, w) for (_, y), w in zip(synthetic, want, strict=True))
    ds = ImageDataset(samples, spec, train=True, seed=3)
    assert not torch.equal(ds[(0, 1, 0)][0], ds[(0, 1, 1)][0])  # a repeat gets its own crop
    assert torch.equal(ds[(0, 1, 0)][0], ds[(0, 1)][0])  # draw 0 is a shuffled epoch's seed

    lengths = [5 + i % 9 for i in range(48)]
    text = LengthBucketSampler(lengths, 4, train=True, seed=3, world=2, rank=0, labels=labels)
    other = LengthBucketSampler(lengths, 4, train=True, seed=3, world=2, rank=1, labels=labels)
    drawn = sorted(i for s in (text, other) for b in s.batches() for i in b)
    single = ShardedBatchSampler(48, 8, train=True, seed=3, labels=labels)
    assert drawn == sorted(it[0] for b in single for it in b)


def test_the_dali_loader_trains_on_the_plan(shapes4) -> None:
    """DALI's training batches (CPU pipeline, rank 1 of 2, resumed at batch 1) are the planned samples'."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from fastft.data.dali_feed import DaliLoader

    files = sorted(str(p) for p in (shapes4 / "train").rglob("*.jpg"))  # 48 files
    labels = [int(i < 6) for i in range(len(files))]
    common = {"batch_size": 8, "crop_size": 16, "resize_size": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    ld = DaliLoader(list(zip(files, labels)), train=True, balanced=True, seed=3, shard_id=1, num_shards=2, **common)
    plan = ShardedBatchSampler(48, 8, train=True, seed=3, rank=1, world=2, labels=labels)
    try:
        ld.set_epoch(1, 1)
        plan.set_epoch(1, 1)
        got = [y.tolist() for _, y in ld]
    finally:
        ld.close()
    assert got == [[labels[it[0]] for it in b] for b in plan] and len(got) == 2
