"""The loader seam: pick the torchvision, DALI or synthetic loader from `data.loader`, check the files once, and
shard the loader by rank (`build_loader`, the one place loaders are made)."""

from __future__ import annotations

import importlib.util
import logging

from fastft.config import AugmentConfig, DataConfig
from fastft.data.base import PREFETCH_PER_WORKER, Loader
from fastft.data.checks import screen
from fastft.data.index import Sample
from fastft.data.transforms import TransformSpec
from fastft.parallel.env import DistEnv

log = logging.getLogger("fastft")


def dali_available(device=None) -> bool:
    """DALI is installed (cheap check); with a CUDA `device`, also importable and built for a CUDA this driver runs."""
    if device is None or device.type != "cuda":
        return importlib.util.find_spec("nvidia.dali") is not None
    return _dali_problem() is None


def _dali_problem() -> str | None:
    """Why DALI cannot run on this machine's GPU, or None."""
    if importlib.util.find_spec("nvidia.dali") is None:
        return "NVIDIA DALI is not installed"
    try:
        import nvidia.dali.backend as backend
    except Exception as e:  # a broken install, or CUDA libraries it cannot load
        return f"nvidia.dali cannot be imported ({type(e).__name__}: {e})"
    built, driver = backend.__cuda_version__ // 1000, backend.GetCudaVersion() // 1000  # e.g. 13020 -> 13
    if driver < built:
        return (
            f"this DALI is built for CUDA {built}, the driver runs CUDA {driver or 'none'}: install the matching "
            f"DALI extra (fastft[dali-cuda{driver}])"
        )
    return None


def resolve_loader(cfg: DataConfig, env: DistEnv, *, pixel_aug: AugmentConfig | None = None) -> str:
    """`auto`: DALI on a GPU when it can run there (GPU decode); the torchvision loader otherwise (on a GPU, with the
    reason logged), and whenever `pixel_aug` has a per-sample option on (the torchvision loader applies them)."""
    if cfg.loader != "auto":
        return cfg.loader
    if env.device.type != "cuda":
        return "torch"
    if pixel_aug is not None and pixel_aug.pixel_options():
        log.info("fastft: data.loader=auto: the torchvision loader (%s)", pixel_aug.pixel_options()[0])
        return "torch"
    problem = _dali_problem()
    if problem is None:
        return "dali"
    log.info("fastft: data.loader=auto: the torchvision loader (%s)", problem)
    return "torch"


def build_loader(
    samples: list[Sample],
    spec: TransformSpec,
    cfg: DataConfig,
    *,
    train: bool,
    seed: int,
    env: DistEnv,
    batch_size: int | None = None,
    pixel_aug: AugmentConfig | None = None,
) -> Loader:
    """The loader `data.loader` picks (`resolve_loader`) for one rank, after the file checks.

    Every file is checked here, before training starts, and `data.on_bad_file` applied once, for every loader: a bad
    file stops the run now, naming it, or is dropped on every rank alike and listed in the loader's `skipped` (see
    checks.py). The synthetic loader reads no file and checks none.

    Returns:
        A `Loader` of (images float32 B3HW, targets) batches: int64 (B,) class indices, or float32 (B, C)
        multi-hot rows for a multilabel task.

    Raises:
        DataError: `data.on_bad_file = "error"` and a file is unusable, or too few samples for one batch per rank.
    """
    bs = batch_size or cfg.batch_size
    kind = resolve_loader(cfg, env, pixel_aug=pixel_aug if train else None)
    skipped: list[str] = []
    if kind != "synthetic":
        samples, skipped = screen(samples, on_bad_file=cfg.on_bad_file, threads=max(2, cfg.workers), env=env)
    if kind == "synthetic":
        loader = _synthetic_loader(
            samples, spec, train=train, seed=seed, env=env, batch_size=bs, balanced=cfg.sampler == "balanced"
        )
    elif kind == "dali":
        loader = _dali_loader(samples, spec, cfg, train=train, seed=seed, env=env, batch_size=bs)
    else:
        loader = _torch_loader(samples, spec, cfg, train=train, seed=seed, env=env, batch_size=bs, pixel_aug=pixel_aug)
    loader.skipped = skipped
    return loader


def _dali_loader(
    samples: list[Sample],
    spec: TransformSpec,
    cfg: DataConfig,
    *,
    train: bool,
    seed: int,
    env: DistEnv,
    batch_size: int,
) -> Loader:
    from fastft.data.dali_feed import DaliLoader

    cuda = env.device.type == "cuda"
    return DaliLoader(
        samples,
        train=train,
        augment=cfg.augment,
        batch_size=batch_size,
        crop_size=spec.crop_size,
        resize_size=spec.resize_size,
        mean=spec.mean,
        std=spec.std,
        shard_id=env.rank,
        num_shards=env.world_size,
        threads=max(1, cfg.workers),
        # CPU training: as many batches ahead as the torchvision loader keeps, so the first epoch's decode
        # overlaps model set-up as far; GPU decode keeps up with DALI's default queue of 2.
        prefetch=PREFETCH_PER_WORKER * max(1, cfg.workers) if train and not cuda else 2,
        seed=seed,
        device="cuda" if cuda else "cpu",
        device_id=env.device.index if cuda else None,
        interpolation=spec.interpolation,
        balanced=cfg.sampler == "balanced",
    )


def _torch_loader(
    samples: list[Sample],
    spec: TransformSpec,
    cfg: DataConfig,
    *,
    train: bool,
    seed: int,
    env: DistEnv,
    batch_size: int,
    pixel_aug: AugmentConfig | None = None,
) -> Loader:
    from fastft.data.torch_loader import TorchLoader

    return TorchLoader(
        samples,
        spec,
        train=train,
        augment=cfg.augment,
        batch_size=batch_size,
        workers=cfg.workers,
        seed=seed,
        rank=env.rank,
        world=env.world_size,
        pin_memory=cfg.pin_memory and env.device.type == "cuda",
        persistent_workers=cfg.persistent_workers,
        pixel_aug=pixel_aug if train else None,
        balanced=cfg.sampler == "balanced",
    )


def _synthetic_loader(
    samples: list[Sample],
    spec: TransformSpec,
    *,
    train: bool,
    seed: int,
    env: DistEnv,
    batch_size: int,
    balanced: bool = False,
):
    return SyntheticLoader(
        samples,
        spec,
        batch_size=batch_size,
        train=train,
        seed=seed,
        rank=env.rank,
        world=env.world_size,
        device=env.device,
        balanced=balanced,
    )


class SyntheticLoader:
    """In-memory batches with the real labels' count and sharding but no decode (throughput benchmarks: it
    measures the model and the loop with data loading removed). One normalised random batch is reused; it and the
    labels live on `device`, so a GPU run copies nothing from the host per step (as the forward-only limit)."""

    def __init__(
        self,
        samples: list[Sample],
        spec: TransformSpec,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int,
        world: int,
        device=None,
        balanced: bool = False,
    ) -> None:
        import torch

        from fastft.data.sampler import ShardedBatchSampler

        labels = [y for _, y in samples] if balanced else None
        self.sampler = ShardedBatchSampler(
            len(samples), batch_size, train=train, seed=seed, rank=rank, world=world, labels=labels
        )
        self.labels = torch.tensor([y for _, y in samples], dtype=torch.long, device=device)
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, spec.crop_size, spec.crop_size, generator=g).to(device)
        self.skipped: list[str] = []  # no file is read

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def start(self, epoch: int, start_batch: int = 0) -> None:
        """Nothing to load ahead: the batch is in memory."""
        self.set_epoch(epoch, start_batch)

    def close(self) -> None:
        """Nothing to release: no workers."""

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        import torch

        for batch in self.sampler:
            idx = torch.tensor([item[0] for item in batch], dtype=torch.long).to(self.labels.device, non_blocking=True)
            yield self.images[: len(idx)], self.labels[idx]
