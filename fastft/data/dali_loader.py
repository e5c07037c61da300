"""DALI input pipeline: decode and augment on CPU or GPU, sharded by rank, exact in evaluation.

One `DaliLoader` is one rank's view of a list of (path, label) pairs:

- training: the batches are those of fastft's own `ShardedBatchSampler` (the torchvision loader's): one
  permutation per epoch from (seed, epoch), shared by all ranks and dealt into disjoint shards; every rank yields
  the same number of *full* batches, `(N // num_shards) // batch_size`. The file bytes reach DALI through an
  `external_source` that follows that plan, so the order depends only on (seed, epoch, start_batch, shard): a
  resumed run trains exactly the samples the interrupted one had left, and DALI and the torchvision loader see the
  same samples in the same order. With augmentation the feed also gives each sample the crop window and flip that
  the torchvision loader draws for it (`transforms.train_crop`, from (seed, epoch, index)); DALI decodes only that
  window (`decoders.image_slice`) and resizes it. So the crops repeat on resume too, and both loaders train on the
  same windows (pixels within resampling differences).
- evaluation: `fn.readers.file` without shuffling, each rank keeps its shard (`stick_to_shard`), the reader pads
  shards to equal length (`pad_last_batch`) and the iterator trims the padding (`LastBatchPolicy.PARTIAL`): over all
  ranks every file is yielded exactly once, and every rank iterates equally often, the last batch possibly short or
  empty.

DALI is imported only when a loader is built, so `import fastft` stays light.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from fastft.data.checks import find_undecodable, open_regular, reason_of, screen
from fastft.data.transforms import sample_seed, train_crop
from fastft.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

_INSTALL_HINT = "NVIDIA DALI is not installed: pip install 'fastft[dali]' (nvidia-dali-cuda130)"
_READER = "reader"  # the reader's name, which the DALI iterator queries for shard sizes and padding
# The preset's resize filter (torchvision InterpolationMode value) -> DALI's: both antialias when downscaling.
_INTERP = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}


def _import_dali():
    """Returns (fn, types, Pipeline, DALIGenericIterator, LastBatchPolicy); raises ImportError with a hint."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return fn, types, Pipeline, DALIGenericIterator, LastBatchPolicy


def _eval_geometry(images, resize_size: int, crop_size: int, fn, types, interp):
    """Resize + centre-crop placement computed exactly as torchvision's eval preset does it.

    torchvision's `Resize(s)` sets the shorter side to `s` and the longer to `int(s * long / short)`
    (DALI's `resize_shorter` rounds instead), and `CenterCrop` puts the crop at
    `int(round((size - crop) / 2))` with round-half-to-even (DALI rounds halves up). Either
    difference shifts the crop by a pixel, so both are computed here from the decoded shape.

    Returns:
        (resized images, crop_pos_x, crop_pos_y) for `crop_mirror_normalize`.
    """
    from nvidia.dali import math as dmath

    hw = images.shape(dtype=types.FLOAT)  # decoded images are HWC; the shape is read on the CPU
    h, w = hw[0], hw[1]
    short = dmath.min(h, w)
    new_h = dmath.floor(resize_size * h / short)
    new_w = dmath.floor(resize_size * w / short)
    images = fn.resize(
        images,
        resize_y=new_h,
        resize_x=new_w,
        interp_type=interp,  # antialiased when downscaling (DALI default), like PIL's resize
    )

    def centre(extent):
        slack = extent - crop_size
        half = dmath.floor(slack / 2)
        odd_slack = slack - 2 * half  # 1 when the centre falls on a half pixel
        odd_half = half - 2 * dmath.floor(half / 2)
        anchor = half + odd_slack * odd_half  # round half to even, like Python's round()
        return anchor / dmath.max(slack, 1.0)  # crop_pos is relative to the slack

    return images, centre(new_w), centre(new_h)


def _shard_range(n: int, shard_id: int, num_shards: int) -> range:
    """The indices DALI's reader assigns to a shard (see DALI docs, "Shard calculation")."""
    return range(shard_id * n // num_shards, (shard_id + 1) * n // num_shards)


class _TrainFeed:
    """The training pipeline's `external_source`: each call returns the next planned batch (encoded file bytes and
    labels) of `ShardedBatchSampler`'s batches, epoch after epoch, so prefetching runs on into the next epoch.

    DALI calls it from the thread that runs or resets the pipeline (sequential mode), in order, once per batch, so
    `fed` (what went in and has not been handed to the loader yet, oldest first) tells which batch comes out next
    and which files are in flight. `seek` re-plans the batches not yet fed. The loader holds the feed and the
    pipeline holds the feed, but the feed does not hold the loader (no reference cycle).
    """

    def __init__(
        self, samples: list[tuple[str, int]], sampler, epoch: int, start_batch: int, *, crop_seed: int | None = None
    ) -> None:
        self.samples = samples
        self.crop_seed = crop_seed  # None: no augmentation; else each sample's crop and flip (`train_crop`)
        self.sampler = sampler
        self.length = len(sampler)
        self._epoch_batches: tuple[int, list[list[int]]] | None = None  # (epoch, its batches' indices), cached
        self.fed: deque[tuple[int, int, list[str]]] = deque()
        self.pos = self._normal(epoch, start_batch)  # (epoch, batch) the next call feeds
        self._pool = None  # one reader thread, started on the first call
        self._ahead = None  # ((epoch, batch), future of its files' bytes): the next planned batch, being read

    def _normal(self, epoch: int, batch: int) -> tuple[int, int]:
        return (epoch, batch) if batch < self.length else (epoch + 1, 0)

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._epoch_batches = (epoch, [[i for i, _ in batch] for batch in self.sampler])
        return self._epoch_batches[1]

    def next_out(self) -> tuple[int, int]:
        """The (epoch, batch) the pipeline outputs next."""
        return self.fed[0][:2] if self.fed else self.pos

    def seek(self, epoch: int, batch: int) -> None:
        """Feed from (epoch, batch) on; batches already fed still come out first (the loader discards them)."""
        self.pos = self._normal(epoch, batch)

    def _read_ahead(self, pos: tuple[int, int]) -> None:
        """Start loading the batch at `pos` in a background thread (file reads release the GIL), so the thread that
        runs the pipeline, the training loop's, does not wait on storage. The plan (which samples) is looked up
        here, in the calling thread: the sampler and its cached epoch are used by one thread only."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fastft-dali-feed")
        self._ahead = (pos, self._pool.submit(self._load, pos[0], self._batches(pos[0])[pos[1]]))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None

    def _load(self, epoch: int, indices: list[int]) -> tuple:
        """One batch as the pipeline takes it: the files' bytes, the labels (B, 1) like the file reader's, and with
        augmentation each sample's crop anchor (top, left), crop shape (height, width) and flip. Reads only
        `samples` and `crop_seed`, which never change, so it may run in the read-ahead thread."""
        import numpy as np

        paths = [self.samples[i][0] for i in indices]
        data = _read_files(paths)
        labels = np.array([[self.samples[i][1]] for i in indices], dtype=np.int32)
        if self.crop_seed is None:
            return data, labels
        anchors, shapes, flips = [], [], []
        for i, path, encoded in zip(indices, paths, data, strict=True):
            width, height = _upright_size(encoded, path)
            top, left, h, w, flip = train_crop(width, height, sample_seed(self.crop_seed, epoch, i))
            anchors.append(np.array([top, left], dtype=np.float32))
            shapes.append(np.array([h, w], dtype=np.float32))
            flips.append(np.array(int(flip), dtype=np.int32))
        return data, labels, anchors, shapes, flips

    def __call__(self):
        pos = self.pos
        indices = self._batches(pos[0])[pos[1]]
        if self._ahead is not None and self._ahead[0] == pos:
            batch = self._ahead[1].result()  # raises the DataError of a file it could not read
        else:  # the first batch, or a re-planned position
            batch = self._load(pos[0], indices)
        self.fed.append((*pos, [self.samples[i][0] for i in indices]))
        self.pos = self._normal(pos[0], pos[1] + 1)
        self._read_ahead(self.pos)
        return batch


def _upright_size(encoded, path: str) -> tuple[int, int]:
    """(width, height) of an encoded image as decoded upright (EXIF orientation applied, as DALI's decoder and the
    torchvision loader do), from its header alone."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as im:
            width, height = im.size
            # The orientation DALI's decoder applies: the EXIF block's tag only (not an XMP copy), and not for
            # formats whose size PIL already reports rotated (TIFF keeps it in its own tags, outside info["exif"]).
            exif = Image.Exif()
            if im.info.get("exif"):
                exif.load(im.info["exif"])
            if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except Exception as e:  # PIL names the in-memory buffer; the message names the file instead
        raise DataError(f"unreadable image file {path}: {reason_of(e)}") from None
    return width, height


def _read_files(paths: list[str]) -> list:
    import numpy as np

    data = []
    for path in paths:
        try:
            with open_regular(path) as f:  # never a pipe or device (a file replaced since the check fails, not hangs)
                data.append(np.frombuffer(f.read(), dtype=np.uint8))
        except OSError as e:
            raise DataError(f"unreadable image file {path}: {reason_of(e)}") from None
    return data


# ---------------------------------------------------------------------------------------------


class DaliLoader:
    """Iterates (images, labels) batches of one rank's shard through a DALI pipeline.

    Training follows `ShardedBatchSampler(len(samples), batch_size, train=True, seed, shard_id, num_shards)`, the
    torchvision loader's sampler, and its crops and flips (`transforms.train_crop`): the same samples in the same
    order, cropped the same way, for a given (seed, epoch, start_batch, shard), whatever happened before (a resume
    included).

    Args:
        samples: (path, label) pairs; the label mapping is the caller's.
        train: random resized crop + horizontal flip and per-epoch shuffling, full batches only;
            otherwise resize shorter side + centre crop, no shuffling, every sample exactly once.
        batch_size: samples per batch on this rank.
        crop_size: output height and width.
        resize_size: shorter side before the centre crop (evaluation only).
        mean, std: normalisation in 0..1 units, like torchvision presets.
        shard_id, num_shards: this rank and the world size.
        threads: DALI CPU threads.
        prefetch: pipeline prefetch queue depth (batches in flight).
        seed: shuffle seed (must be equal on all ranks), as for `ShardedBatchSampler`; each sample's crop window
            and flip come from (seed, epoch, sample index), as in the torchvision loader (`transforms.train_crop`).
        device: "cpu" (all CPU operators) or "cuda" (mixed decode on the GPU, GPU operators).
        device_id: CUDA device index, required for "cuda"; ignored for "cpu".
        hw_decoder_load: share of JPEGs sent to the hardware decoder (A100/H100 class GPUs).
        on_bad_file: "error" raises DataError naming the first unreadable file; "skip" drops
            unreadable files before the pipeline is built and lists them in `self.skipped` (`checks.screen`);
            None: the samples were screened by the caller.
        interpolation: the weights preset's resize filter, "bilinear" or "bicubic" (torchvision's
            InterpolationMode values), for training crops and evaluation alike.

    Raises:
        ImportError: DALI is not installed.
        ConfigError: an argument value is invalid.
        DataError: no samples, fewer samples than one training batch per shard, or an unreadable file.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        train: bool,
        batch_size: int,
        crop_size: int,
        resize_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        shard_id: int = 0,
        num_shards: int = 1,
        threads: int = 2,
        prefetch: int = 2,
        seed: int = 0,
        device: str = "cpu",
        device_id: int | None = None,
        hw_decoder_load: float = 0.65,
        on_bad_file: str | None = "error",
        augment: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        _import_dali()  # fail early with the install hint
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda" and device_id is None:
            raise ConfigError("device='cuda' needs a device_id (the local CUDA device index)")
        if interpolation not in _INTERP:
            raise ConfigError(f"interpolation must be one of {tuple(_INTERP)}, got {interpolation!r}")
        if not 0 <= shard_id < num_shards:
            raise ConfigError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        if batch_size < 1 or crop_size < 1 or resize_size < 1 or threads < 1 or prefetch < 1:
            raise ConfigError("batch_size, crop_size, resize_size, threads and prefetch must be positive")
        if not (train and augment) and resize_size < crop_size:
            raise ConfigError(f"resize_size ({resize_size}) must be at least crop_size ({crop_size}) for evaluation")

        self.train = train
        self.augment = augment  # training without augmentation: shuffled full batches with the eval transform
        self.start_batch = 0
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.threads = threads
        self.prefetch = prefetch
        self.seed = seed
        self.device = device
        self.device_id = device_id if device == "cuda" else None  # a CPU pipeline with a device id needs CUDA
        self.hw_decoder_load = hw_decoder_load
        self.epoch = 0

        self.interpolation = interpolation
        samples = [(str(p), int(y)) for p, y in samples]
        self.skipped: list[str] = []
        if on_bad_file is not None:  # None: the caller has screened the samples (build_loader, once for all ranks)
            samples, self.skipped = screen(samples, on_bad_file=on_bad_file, threads=max(4, threads))
        self.samples = samples

        n = len(self.samples)
        if n == 0:
            raise DataError("no readable image files to load")
        if n < num_shards:
            raise DataError(f"{n} samples cannot be split over {num_shards} shards (each shard needs at least one)")
        if train:
            from fastft.data.torch_loader import ShardedBatchSampler

            # Full batches only, and the same count on every rank: each rank gets N // num_shards samples.
            self._sampler = ShardedBatchSampler(n, batch_size, train=True, seed=seed, rank=shard_id, world=num_shards)
            self._len = len(self._sampler)
            self._num_samples = self._len * batch_size
            if self._len == 0:
                raise DataError(
                    f"{n} training samples over {num_shards} shard(s) give less than one batch of {batch_size} "
                    "per shard"
                )
        else:
            # Shards differ by at most one sample; every rank iterates as often as the largest needs.
            self._len = math.ceil(math.ceil(n / num_shards) / batch_size)
            self._num_samples = len(_shard_range(n, shard_id, num_shards))
        self._iterator = None  # built on first iteration: building starts decoding in background threads
        self._feed: _TrainFeed | None = None  # training: what the pipeline is fed, built with the iterator
        self._dali_len = 0  # evaluation: batches DALI produces per epoch on this rank, padding included
        self._consumed = 0  # evaluation: batches taken from DALI in the current epoch

    def __len__(self) -> int:
        """Batches this shard yields per epoch (equal on all shards)."""
        return self._len

    @property
    def num_samples(self) -> int:
        """Real (non-padded) samples this shard yields per epoch."""
        return self._num_samples

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields the batches of `epoch` from `start_batch` on (a mid-epoch resume).

        Training: the batches are `ShardedBatchSampler`'s for that epoch, so any (epoch, start_batch) can be asked
        for, in any order; without a call, each iteration continues with the epoch after the last one started (an
        epoch abandoned part-way is not finished). The pipeline prefetches into the next epoch; a call that asks for
        something else discards only the batches already prefetched; it does not rebuild the pipeline.
        Evaluation: every epoch is the same; `start_batch` skips that many batches."""
        self.epoch = epoch
        self.start_batch = start_batch

    def start(self, epoch: int, start_batch: int = 0) -> None:
        """Build the pipeline now: DALI decodes its first `prefetch` batches while the caller does other set-up
        work (and a file DALI cannot decode in them fails here, before training)."""
        self.set_epoch(epoch, start_batch)
        self._get_iterator()

    def close(self) -> None:
        """Release the pipeline (its threads and buffers); a later iteration builds a new one."""
        self._iterator = None
        self._drop_feed()
        self._consumed = 0

    def _drop_feed(self) -> None:
        if self._feed is not None:
            self._feed.close()  # its read-ahead thread
            self._feed = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.train:
            yield from self._train_epoch()
            return
        it = self._get_iterator()
        if self._consumed:  # the previous epoch was abandoned part-way: finish it so the next one starts clean
            while self._consumed < self._dali_len:
                self._next(it)
            self._reset(it)
        skip, self.start_batch = self.start_batch, 0
        for step in range(self._dali_len):
            batch = self._next(it)
            if skip <= step < self._len:
                yield batch
            # else: the ragged remainder and padding of a training shard, dropped to keep ranks in lockstep
        self._reset(it)

    # -- internals ------------------------------------------------------------------------------

    def _train_epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.start_batch
        # Unless set_epoch says otherwise, the next iteration is the next epoch (also when this one is abandoned).
        self.epoch, self.start_batch = epoch + 1, 0
        if start >= self._len:
            return  # this epoch is already done (resumed at its end)
        it = self._get_iterator()
        feed = self._feed
        if feed.next_out() != (epoch, start):
            # Another position than the pipeline is heading for (a jump, or an abandoned epoch): feed from the asked
            # one on, and discard what was already fed (the prefetched batches).
            feed.seek(epoch, start)
            for _ in range(len(feed.fed)):
                self._next(it)
        for b in range(start, self._len):
            assert feed.next_out() == (epoch, b), (feed.next_out(), (epoch, b))
            yield self._next(it)

    def _next(self, it) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            out = next(it)[0]
        except StopIteration:
            raise RuntimeError("DALI pipeline ended before the expected epoch length") from None
        except RuntimeError as e:
            error = self._data_error(e)
            if error is None:
                raise
            self.close()  # the pipeline is in an error state; a later iteration builds a new one
            raise error from None
        except DataError:  # a file the feed could not read
            self.close()
            raise
        if self._feed is not None:
            self._feed.fed.popleft()
        self._consumed += 1
        # DALI gives labels as int32 (B, 1); a (0, ...) slice is an empty last batch, which is yielded as is.
        return out["images"], out["labels"].reshape(-1).long()

    def _reset(self, it) -> None:
        it.reset()
        self._consumed = 0

    def _get_iterator(self):
        if self._iterator is None and self.train:
            _, _, _, DALIGenericIterator, _ = _import_dali()
            # The feed starts where the next iteration starts, so the batches built and prefetched now are used.
            self._feed = _TrainFeed(
                self.samples, self._sampler, self.epoch, self.start_batch, crop_seed=self.seed if self.augment else None
            )
            pipe = self._build_pipeline()
            try:
                # No reader and no epoch end: the feed runs on through the epochs, and __iter__ takes len() batches.
                self._iterator = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=False)
            except RuntimeError as e:  # the first batch is decoded while the iterator is built
                error = self._data_error(e)
                self._drop_feed()
                if error is None:
                    raise
                raise error from None
            except DataError:
                self._drop_feed()
                raise
        elif self._iterator is None:
            _, _, _, DALIGenericIterator, LastBatchPolicy = _import_dali()
            pipe = self._build_pipeline()
            try:
                # PARTIAL: DALI trims the padding, so a last batch may be short or empty.
                self._iterator = DALIGenericIterator(
                    [pipe],
                    ["images", "labels"],
                    reader_name=_READER,
                    auto_reset=False,
                    last_batch_policy=LastBatchPolicy.PARTIAL,
                )
            except RuntimeError as e:  # the first batch is decoded while the iterator is built
                error = self._data_error(e)
                if error is None:
                    raise
                raise error from None
            self._dali_len = len(self._iterator)
            if self._dali_len < self._len:
                raise RuntimeError(f"DALI plans {self._dali_len} batches per epoch, expected at least {self._len}")
        return self._iterator

    def _build_pipeline(self):
        fn, types, Pipeline, _, _ = _import_dali()
        cuda = self.device == "cuda"
        interp = getattr(types, _INTERP[self.interpolation])
        # Nothing in the pipeline draws at random: the training order, crops and flips all come from the feed.
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            seed=(self.seed * 1_000_003 + self.shard_id) % (2**31),
            prefetch_queue_depth=self.prefetch,
        )
        with pipe:
            if self.train:
                # The sampler's batches, in its order: encoded bytes and labels from the feed (see _TrainFeed), and
                # with augmentation each sample's crop window (top, left), (height, width) and flip.
                n = 5 if self.augment else 2
                outputs = fn.external_source(
                    source=self._feed,
                    num_outputs=n,
                    batch=True,
                    dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32][:n],
                    ndim=[1, 1, 1, 1, 0][:n],
                )
                jpegs, labels_out = outputs[0], outputs[1]
            else:
                # Evaluation: each rank keeps its own shard, padded to the largest one (the iterator trims it).
                jpegs, labels_out = fn.readers.file(
                    files=[p for p, _ in self.samples],
                    labels=[y for _, y in self.samples],
                    name=_READER,
                    shard_id=self.shard_id,
                    num_shards=self.num_shards,
                    pad_last_batch=True,
                    random_shuffle=False,
                    stick_to_shard=True,
                )
            decode = {"device": "mixed", "hw_decoder_load": self.hw_decoder_load} if cuda else {"device": "cpu"}
            if self.train and self.augment:
                # Decode only the window (the rest of the JPEG is skipped), then resize it to the output size.
                _, _, anchor, shape, mirror = outputs
                images = fn.decoders.image_slice(
                    jpegs,
                    anchor,
                    shape,
                    axis_names="HW",
                    normalized_anchor=False,
                    normalized_shape=False,
                    output_type=types.RGB,
                    **decode,
                )
                images = fn.resize(
                    images,
                    resize_x=self.crop_size,
                    resize_y=self.crop_size,
                    interp_type=interp,  # antialiased when downscaling (DALI default), like PIL's resize
                )
                crop_pos_x = crop_pos_y = 0.5  # the crop already has the output size
            else:
                images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
                images, crop_pos_x, crop_pos_y = _eval_geometry(
                    images, self.resize_size, self.crop_size, fn, types, interp
                )
                mirror = 0
            if cuda:
                labels_out = labels_out.gpu()
            images = fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="CHW",
                crop=(self.crop_size, self.crop_size),
                crop_pos_x=crop_pos_x,
                crop_pos_y=crop_pos_y,
                mean=[255.0 * m for m in self.mean],
                std=[255.0 * s for s in self.std],
                mirror=mirror,
            )
            pipe.set_outputs(images, labels_out)
        return pipe

    def _data_error(self, err: RuntimeError) -> DataError | None:
        """Turns a DALI failure to read or decode a file into a one-line DataError naming the file when possible.

        Returns None for failures elsewhere in the pipeline (e.g. out of memory): those are not data errors.
        """
        message = str(err)
        if not any(op in message for op in ("fn.readers.file", "fn.decoders.image")):
            return None
        named = [path for path, _ in self.samples if path in message]
        if named:
            return DataError(f"unreadable image file {max(named, key=len)}: DALI could not read or decode it")
        # DALI did not name the file: decode the files this rank reads with PIL to find it (error path only).
        paths = [path for path, _ in self.samples]
        if self._feed is not None:  # training: the batches in flight hold it (then, to be safe, the rest)
            in_flight = [path for _, _, batch in self._feed.fed for path in batch]
            first = set(in_flight)
            paths = in_flight + [p for p in paths if p not in first]
        else:  # evaluation shards are fixed
            paths = [paths[i] for i in _shard_range(len(paths), self.shard_id, self.num_shards)]
        found = find_undecodable(paths, threads=max(4, self.threads))
        if found is not None:
            return DataError(f"unreadable image file {found[0]}: {found[1]}")
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "fail" in ln.lower()), lines[0] if lines else "unknown error")
        return DataError(f"DALI failed to read or decode an image: {detail}")
