"""The torchvision DataLoader path: the shared sampler's batches (sampler.py) and augmentation that is a pure function
of (seed, epoch, sample index), so results do not depend on the worker count, the world size or a resume."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import torch
from PIL import Image, ImageOps

from fastft.data.base import PREFETCH_PER_WORKER
from fastft.data.checks import check_size, open_regular, reason_of
from fastft.data.index import Sample
from fastft.data.sampler import ShardedBatchSampler, sample_seed
from fastft.data.transforms import TransformSpec, torchvision_transform
from fastft.errors import DataError


def open_rgb(path: str) -> Image.Image:
    """Decode any PIL-readable image to RGB (grayscale, CMYK, alpha and 16-bit images are converted).

    Reads only regular files (`checks.open_regular`) and refuses images over the pixel limit (`checks.check_size`),
    as the up-front check does, so a file changed since the check fails with one line naming it."""
    with open_regular(path) as f:
        return _decode_rgb(f, path)


def _decode_rgb(f, path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is check_size's
            im = Image.open(f)
        with im:
            too_big = check_size(*im.size)
            if too_big:
                raise DataError(f"unreadable image file {path}: {too_big}")
            im.load()
            # Honour the EXIF orientation tag, as DALI's decoder does, so both loaders see photos upright.
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit: scale to 8-bit before RGB conversion (PIL clips instead of scaling)
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"unreadable image file {path}: {reason_of(e)}") from None


class ImageDataset(torch.utils.data.Dataset):
    """Indexed by (sample index, epoch) so augmentation is reproducible under any sharding or worker count."""

    def __init__(
        self,
        samples: list[Sample],
        spec: TransformSpec,
        *,
        train: bool,
        augment: bool = True,
        seed: int = 0,
        pixel_aug=None,
    ) -> None:
        self.samples = samples
        self.train = train and augment  # without augmentation, training sees the eval transform
        # `pixel_aug`: an AugmentConfig (policy, colour jitter, random erasing) on top of crop + flip
        self.transform = torchvision_transform(spec, train=self.train, augment=pixel_aug if self.train else None)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[torch.Tensor, int | torch.Tensor]:
        index, epoch, *draw = key  # draw: the balanced sampler's repeat count (sampler.sample_seed)
        path, label = self.samples[index]
        if isinstance(label, tuple):  # multilabel: the multi-hot row, batched as (B, C) float32
            label = torch.tensor(label, dtype=torch.float32)
        image = open_rgb(path)
        if not self.train:
            return self.transform(image), label
        # The transforms (crop, flip and any [augment] policy, jitter, erasing) draw from the global CPU generator: seed
        # it for this sample and restore it after. Only that
        # generator: torch.manual_seed would also reseed every CUDA generator (which fork_rng(devices=[]) does not
        # restore), so with workers=0 the model's dropout would follow the last sample loaded.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index, *draw))
            return self.transform(image), label


class ForkSafeDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose forked workers never finalise the garbage they inherit.

    A native object awaiting collection in a reference cycle (a DALI pipeline from an earlier loader, say) would
    otherwise be finalised by the garbage collector of a forked worker, where its library's threads do not exist: its
    destructor then waits for them forever while holding the GIL, and the worker hangs. Every object tracked at the
    fork is frozen for the fork (gc.freeze: the workers' collectors never look at them) and unfrozen after it in this
    process, which collects them as usual. A full collection before the fork did the same at 0.2-0.4 s per loader
    start; freezing is constant-time. Where the caller has frozen objects of its own (gc.get_freeze_count() > 0), they
    must stay frozen: the full collection is kept there."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        if gc.get_freeze_count():
            gc.collect()
            return super()._get_iterator()
        gc.freeze()
        try:
            return super()._get_iterator()  # forks the workers (persistent: once)
        finally:
            gc.unfreeze()


def batch_loader(
    dataset: ImageDataset,
    sampler: ShardedBatchSampler,
    *,
    workers: int,
    seed: int,
    pin_memory: bool = False,
    persistent: bool = True,
) -> torch.utils.data.DataLoader:
    """The DataLoader every image path uses: workers prefetch PREFETCH_PER_WORKER batches each, and worker seeds
    come from the loader's own generator, so starting an epoch never draws from the global RNG (when loading starts,
    early or after a resume, does not change the model's random stream)."""
    return ForkSafeDataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=PREFETCH_PER_WORKER if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _labels(samples: list[Sample], balanced: bool) -> list[int] | None:
    """The labels the balanced sampler draws by (data.sampler = balanced), or None (shuffle)."""
    return [y for _, y in samples] if balanced else None


class TorchLoader:
    """DataLoader over an ImageDataset with a ShardedBatchSampler; yields (images float32 B3HW, labels int64 B, or
    float32 (B, C) multi-hot for a multilabel task)."""

    def __init__(
        self,
        samples: list[Sample],
        spec: TransformSpec,
        *,
        train: bool,
        batch_size: int,
        workers: int = 2,
        augment: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        pixel_aug=None,
        balanced: bool = False,
    ) -> None:
        self.dataset = ImageDataset(samples, spec, train=train, augment=augment, seed=seed, pixel_aug=pixel_aug)
        self.sampler = ShardedBatchSampler(
            len(samples), batch_size, train=train, seed=seed, rank=rank, world=world, labels=_labels(samples, balanced)
        )
        self.loader = batch_loader(
            self.dataset,
            self.sampler,
            workers=workers,
            seed=seed * 1_000_003 + rank,
            pin_memory=pin_memory,
            persistent=persistent_workers,
        )
        self._started: tuple[tuple[int, int], Iterator] | None = None
        self._live: Iterator | None = None
        self.skipped: list[str] = []  # the bad-file policy is applied before a loader is made (build_loader)

    @property
    def num_samples(self) -> int:
        s = self.sampler
        return len(s._indices()) if not s.train else len(s) * s.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self._started is not None and self._started[0] != (epoch, start_batch):
            self._started = None  # started for another epoch: that iterator is dropped
        self.sampler.set_epoch(epoch, start_batch)

    def start(self, epoch: int, start_batch: int = 0) -> None:
        """Begin loading this epoch now: workers spawn and decode up to `prefetch_factor` batches each while the
        caller does other set-up work; the next iteration over this epoch continues from there."""
        self.set_epoch(epoch, start_batch)
        self._started = ((epoch, start_batch), iter(self.loader))

    def close(self) -> None:
        """End the worker processes now, also those of an iteration left part-way (a later one starts new ones)."""
        started, self._started = self._started, None
        live, self._live = self._live, None
        shutdown_workers(self.loader, started[1] if started is not None else None, live)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        it = self._started[1] if self._started is not None else iter(self.loader)
        self._started = None
        self._live = it  # close() reaches it if the consumer stops part-way (e.g. on an error)
        for images, labels in it:
            yield images, labels.long() if labels.ndim == 1 else labels  # multilabel: (B, C) float32 multi-hot
        self._live = None


def shutdown_workers(loader: torch.utils.data.DataLoader | None, *iterators) -> None:
    """Stop the worker processes of `loader`'s persistent iterator and of `iterators` (idempotent)."""
    if loader is not None:
        iterators = (*iterators, loader._iterator)
        loader._iterator = None
    for it in iterators:
        stop = getattr(it, "_shutdown_workers", None)  # multi-process iterators only
        if stop is not None:
            stop()
