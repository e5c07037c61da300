"""Frozen-feature cache: same head as uncached training, rebuilt when a file changes, truncation detected."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fastft.train import finetune


def _head(result) -> dict[str, torch.Tensor]:
    return load_file(result.paths["head_export"])


@pytest.mark.parametrize("freeze", ["backbone", "until:layer3"])
def test_cached_training_equals_uncached_without_augmentation(shapes4, tmp_path, freeze) -> None:
    common = {"optim__epochs": 3, "data__augment": False, "model__freeze": freeze}
    plain = finetune(tiny_config(shapes4, tmp_path, run__name="plain", **common))
    mem = finetune(
        tiny_config(shapes4, tmp_path, run__name="mem", features__cache="memory", features__dtype="fp32", **common)
    )
    disk = finetune(
        tiny_config(
            shapes4,
            tmp_path,
            run__name="disk",
            features__cache="disk",
            features__dtype="fp32",
            features__dir=str(tmp_path / "cache"),
            **common,
        )
    )
    for other in (mem, disk):
        for k, v in _head(plain).items():
            # fp32 features: only the order of floating-point operations may differ
            torch.testing.assert_close(_head(other)[k], v, atol=1e-5, rtol=1e-4, msg=k)
        assert other.metrics["confusion_matrix"] == plain.metrics["confusion_matrix"]
    if freeze != "backbone":
        return  # through trainable conv+BN layers fp16 rounding is amplified; the bound below is for a linear head
    half = finetune(tiny_config(shapes4, tmp_path, run__name="half", features__cache="memory", **common))
    for k, v in _head(plain).items():
        # fp16 storage rounds features to ~3 significant digits; the head stays close
        torch.testing.assert_close(_head(half)[k], v, atol=5e-3, rtol=5e-2, msg=k)


def test_disk_cache_reused_rebuilt_on_change_and_truncation_detected(shapes4, tmp_path, caplog) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes4, data)
    cache = tmp_path / "cache"
    common = {
        "features__cache": "disk",
        "features__dir": str(cache),
        "optim__epochs": 1,
        "data__augment": False,
        "features__dtype": "fp32",
    }
    caplog.set_level(logging.INFO, logger="fastft")
    first = finetune(tiny_config(data, tmp_path, run__name="a", **common))
    keys = {p.name for p in cache.iterdir()}
    assert len(keys) == 2  # train and val tables
    caplog.clear()
    second = finetune(tiny_config(data, tmp_path, run__name="b", **common))
    assert "train disk, val disk" in caplog.text  # reused, not rebuilt
    assert second.metrics["confusion_matrix"] == first.metrics["confusion_matrix"]

    # A changed training file changes the key: a new train table is built, val is reused.
    victim = sorted((data / "train" / "circle").iterdir())[0]
    victim.write_bytes(sorted((data / "train" / "cross").iterdir())[0].read_bytes())
    caplog.clear()
    finetune(tiny_config(data, tmp_path, run__name="c", **common))
    assert "train built, val disk" in caplog.text
    assert len({p.name for p in cache.iterdir()}) == 3

    # A truncated shard is detected and rebuilt, never used.
    shard = max(cache.glob("*/table.npy"), key=os.path.getmtime)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    caplog.clear()
    third = finetune(tiny_config(data, tmp_path, run__name="d", **common))
    assert "truncated" in caplog.text and "rebuilding" in caplog.text
    assert third.metrics["num_samples"] == 24


def test_views_cycle_augmented_copies(shapes4, tmp_path) -> None:
    from fastft.config import DataConfig, ModelConfig
    from fastft.data.index import index_from_config
    from fastft.data.transforms import TransformSpec
    from fastft.features import FeatureLoader, ImageSource, build_features
    from fastft.model import build_model, freeze, split_model
    from fastft.parallel.env import DistEnv
    from fastft.precision import Precision

    model = build_model(ModelConfig(weights="none"), 4)
    freeze(model, "backbone")
    split = split_model(model)
    index = index_from_config(DataConfig(root=str(shapes4)))
    source = ImageSource(index.train, TransformSpec(32, 36), views=3, env=DistEnv(), batch_size=16, workers=0, seed=0)
    table = build_features(
        split.prefix,
        source,
        mode="memory",
        dtype="fp32",
        cache_dir=tmp_path,
        env=DistEnv(),
        precision=Precision(torch.float32, "cpu"),
        channels_last=False,
        train=True,
    )
    feats = table.parts[0]
    assert feats.shape == (3, 48, 512)
    assert not torch.allclose(feats[0], feats[1])  # different augmented views
    loader = FeatureLoader(table, 8, train=True, seed=0, rank=0, world=1)
    seen = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        x, y = next(iter(loader))
        idx = loader.sampler._indices()[:8]
        assert torch.equal(x, feats[epoch % 3][idx])
        seen.append(x)
    assert torch.equal(y, table.labels[idx])


def test_disk_cache_key_covers_seed_precision_and_layout(shapes4, tmp_path) -> None:
    """A cached table is reused only when nothing its values depend on changed: the run seed (it seeds the augmented
    views), the compute precision and channels_last each give a miss; the same settings again give a hit."""
    from fastft.config import DataConfig, ModelConfig
    from fastft.data.index import index_from_config
    from fastft.data.transforms import TransformSpec
    from fastft.features import ImageSource, build_features
    from fastft.model import build_model, freeze, split_model
    from fastft.parallel.env import DistEnv
    from fastft.precision import Precision

    model = build_model(ModelConfig(weights="none"), 4)
    freeze(model, "backbone")
    prefix = split_model(model).prefix
    samples = index_from_config(DataConfig(root=str(shapes4))).train[:8]

    def build(*, views=2, seed=0, dtype=torch.float32, channels_last=False) -> str:
        src = ImageSource(
            samples, TransformSpec(32, 36), views=views, env=DistEnv(), batch_size=8, workers=0, seed=seed
        )
        table = build_features(
            prefix,
            src,
            mode="disk",
            dtype="fp32",
            cache_dir=tmp_path / "cache",
            env=DistEnv(),
            precision=Precision(dtype, "cpu"),
            channels_last=channels_last,
            train=True,
        )
        return table.source

    assert build() == "built"
    assert build() == "disk"
    assert build(seed=1) == "built"  # another seed: other augmented views
    assert build(dtype=torch.bfloat16) == "built"
    assert build(channels_last=True) == "built"
    assert build(views=0) == "built"
    assert build(views=0, seed=1) == "disk"  # the eval transform draws nothing from the seed
    assert len(list((tmp_path / "cache").iterdir())) == 5
