"""What feeds the trainable part: images through the frozen prefix, or the prefix's outputs from the feature cache.

The question "do we train from the cache?" is decided here once, when the run starts (features.cache is on and no
unfreeze has moved the cut yet), and changes only through invalidate(), when an unfreeze changes the prefix."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastft.compile import apply_compile
from fastft.config import FinetuneConfig
from fastft.data.loaders import build_loader
from fastft.errors import ConfigError
from fastft.fold_bn import fold_bn
from fastft.parallel import env as penv

log = logging.getLogger("fastft")


class Inputs:
    """The train and val loaders of a run and the frozen prefix their batches go through.

    Args:
        cfg: the run's config (data, features, model.channels_last, run.seed are read).
        index: the data index; its train/val lists lose the files the loaders skip.
        spec: the preprocessing spec of the model's weights.
        cached: train from the feature cache (decided once by the caller's config and resume position).
        opened: every loader and source opened here is appended, so the caller closes them also on failure.
    """

    def __init__(self, cfg: FinetuneConfig, env: penv.DistEnv, index, spec, *, cached: bool, opened: list) -> None:
        self.cfg, self.env, self.index, self.spec = cfg, env, index, spec
        self.cached = cached
        self.opened = opened
        self.eval_batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
        self.prefix: torch.nn.Module | None = None  # set by use_prefix; None while cached features feed training
        self._runner: torch.nn.Module | None = None  # the prefix as it runs (see _run_prefix)
        self._compile_cfg = None
        self.cache_info: dict = {}  # {wall_s, images, train, val}: the cache build (or reuse)
        self._sources = None
        # Sharded by rank; every file is checked here, before the model is built.
        seed = cfg.run.seed
        self.images = (
            build_loader(index.train, spec, cfg.data, train=True, seed=seed, env=env, pixel_aug=cfg.augment),
            build_loader(index.val, spec, cfg.data, train=False, seed=seed, env=env, batch_size=self.eval_batch_size),
        )
        opened += self.images
        self.train, self.val = self.images
        self.skipped = sorted(set(getattr(self.train, "skipped", [])) | set(getattr(self.val, "skipped", [])))
        if self.skipped:  # the feature cache reads the index: keep it to the files the loaders use
            gone = set(self.skipped)
            index.train = [s for s in index.train if s[0] not in gone]
            index.val = [s for s in index.val if s[0] not in gone]

    def start(self, epoch: int, batch: int, *, training_left: bool) -> None:
        """Start the work that overlaps building the model: the cache's image decode, or the first epoch's loading
        (a finished run that is resumed only evaluates, so it loads nothing)."""
        if self.cached:
            self._sources = _feature_sources(self.cfg, self.index, self.spec, self.env, self.eval_batch_size)
            self.opened += self._sources
        elif training_left:
            self.train.start(epoch, batch)

    def build_cache(self, prefix: torch.nn.Module | None, precision) -> None:
        """Compute (or reuse) the feature tables through `prefix`; from here on the loaders yield features."""
        if not self.cached:
            return
        self.train, self.val, self.cache_info = _cached_loaders(
            self.cfg, prefix, self._sources, self.env, precision, self.eval_batch_size
        )

    def invalidate(self) -> None:
        """The prefix changed (an unfreeze moved the cut): the cached features are stale, train from images."""
        self.cached = False
        self.train, self.val = self.images

    def use_prefix(self, prefix: torch.nn.Module | None, *, compile_cfg=None) -> None:
        """The frozen prefix images go through (compiled when `compile_cfg` is given); none while cached."""
        self.prefix = None if self.cached else prefix
        self._compile_cfg, self._runner = compile_cfg, None

    def _run_prefix(self) -> torch.nn.Module:
        """What computes the prefix's output: the prefix with its BatchNorms folded into their convolutions
        (fastft.fold_bn; the prefix itself is left as it is), compiled when asked. Built at its first use, so after
        a resume has restored the weights, and again after an unfreeze moves the cut (use_prefix)."""
        if self._runner is None:
            runner = _folded(self.prefix, "frozen part", fold=self.cfg.model.fold_bn)
            self._runner = runner if self._compile_cfg is None else apply_compile(runner, self._compile_cfg)
        return self._runner

    def to_device(self, images: torch.Tensor, labels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if self.cfg.model.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def features(self, images: torch.Tensor, precision, dtype: torch.dtype | None) -> torch.Tensor:
        """What the trainable part takes: the prefix's output (or the cached features), in `dtype` when set."""
        if self.prefix is not None:
            # The frozen prefix builds no autograd graph; clone turns its inference tensor into a normal one.
            with torch.inference_mode(), precision.autocast():
                feats = self._run_prefix()(images)
            feats = feats.clone()
        else:
            feats = images
        if dtype is not None:  # the wrapped suffix computes in its own dtype (DeepSpeed bf16/fp16)
            feats = feats.to(dtype)
        return feats

    def eval_forward(self, suffix: torch.nn.Module, dtype: torch.dtype | None) -> Callable:
        """The evaluation forward: prefix (when images feed the run) then `suffix`; sets the prefix to eval."""
        prefix = self._run_prefix() if self.prefix is not None else None
        if prefix is not None:
            prefix.eval()

        def forward(x: torch.Tensor) -> torch.Tensor:
            feats = prefix(x) if prefix is not None else x
            return suffix(feats if dtype is None else feats.to(dtype))

        return forward


def _feature_sources(cfg: FinetuneConfig, index, spec, env: penv.DistEnv, eval_bs: int):
    """The images the train and val feature tables are computed from. A memory cache is always built, so its
    decode starts now, before the model is built; a disk cache may be reused and starts only when it is not."""
    from fastft.features import ImageSource

    common = {"env": env, "batch_size": eval_bs, "workers": cfg.data.workers, "seed": cfg.run.seed}
    train = ImageSource(index.train, spec, views=cfg.features.views, **common)
    val = ImageSource(index.val, spec, views=0, **common)
    if cfg.features.cache == "memory":
        train.start()
        val.start()
    return train, val


def _folded(prefix: torch.nn.Module, what: str, *, fold: bool) -> torch.nn.Module:
    """`prefix` (set to eval, as a frozen prefix always runs) with its BatchNorms folded (fastft.fold_bn), logged;
    the prefix itself when `fold` is off (model.fold_bn)."""
    prefix.eval()
    if not fold:
        return prefix
    runner, folded = fold_bn(prefix)
    if folded:
        log.info("fastft: %s: %d BatchNorm layers folded into their convolutions", what, folded)
    return runner


def _cached_loaders(cfg: FinetuneConfig, prefix, sources, env: penv.DistEnv, precision, eval_bs: int):
    """Build (or reuse) the train and val feature tables: (train loader, val loader, build info)."""
    from fastft.features import FeatureLoader, build_features

    if prefix is None:
        raise ConfigError("features.cache: nothing is frozen before the trainable part, so there is nothing to cache")
    if cfg.data.augment and cfg.features.views == 0:
        log.info("fastft: feature cache with features.views=0 trains on the eval transform (no augmentation)")
    common = cache_options(cfg, env, precision, channels_last=cfg.model.channels_last)
    t0 = time.perf_counter()
    # folded at the first table that is built (a reused disk table needs none), once for both
    runner = functools.cache(lambda: _folded(prefix, "feature cache build", fold=cfg.model.fold_bn))
    # unfolded features differ from folded ones by rounding: a disk cache keeps them apart
    key = None if cfg.model.fold_bn else {"fold_bn": False}
    train_t = build_features(prefix, sources[0], train=True, runner=runner, model=key, **common)
    val_t = build_features(prefix, sources[1], train=False, runner=runner, model=key, **common)
    del runner
    build_s = time.perf_counter() - t0
    log_cache_built(cfg, train_t.source, val_t.source, build_s)
    train_loader = FeatureLoader(
        train_t,
        cfg.data.batch_size,
        train=True,
        seed=cfg.run.seed,
        rank=env.rank,
        world=env.world_size,
        balanced=cfg.data.sampler == "balanced",
    )
    val_loader = FeatureLoader(val_t, eval_bs, train=False, seed=cfg.run.seed, rank=env.rank, world=env.world_size)
    info = {
        "wall_s": build_s,
        "images": train_t.num_samples + val_t.num_samples,
        "train": train_t.source,
        "val": val_t.source,
    }
    return train_loader, val_loader, info


def _default_cache() -> Path:
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))


def cache_options(cfg: FinetuneConfig, env: penv.DistEnv, precision, *, channels_last: bool) -> dict:
    """The keyword arguments `build_features` takes from the run's config (image and text caches alike)."""
    return {
        "mode": cfg.features.cache,
        "dtype": cfg.features.dtype,
        "cache_dir": Path(cfg.features.dir) if cfg.features.dir else _default_cache() / "features",
        "env": env,
        "precision": precision,
        "channels_last": channels_last,
    }


def log_cache_built(cfg: FinetuneConfig, train_source: str, val_source: str, seconds: float) -> None:
    log.info(
        "fastft: feature cache (%s, %s): train %s, val %s in %.1fs",
        cfg.features.cache,
        cfg.features.dtype,
        train_source,
        val_source,
        seconds,
    )
