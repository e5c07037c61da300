"""The DALI loader: one rank's iterator over a DALI pipeline (dali_pipeline.py), and the feed that brings it the
training batches.

One `DaliLoader` is one rank's view of a list of (path, label) pairs, the label a class index or, for a multilabel
task, a multi-hot tuple. DALI carries each sample's index in the list, not its label, and the loader looks the target
up by that index (`_Targets`): one path for both tasks, and a batch's targets are exactly its samples' (class indices
as int64 (B,), multi-hot rows as float32 (B, C), like the torchvision loader's).

- training: the batches are those of fastft's own `ShardedBatchSampler` (sampler.py, the torchvision loader's too):
  one permutation per epoch from (seed, epoch), shared by all ranks and dealt into disjoint shards; every rank yields
  the same number of *full* batches, `(N // num_shards) // batch_size`. The file bytes reach DALI through an
  `external_source` that follows that plan (`_TrainFeed`), so the order depends only on (seed, epoch, start_batch,
  shard): a resumed run trains exactly the samples the interrupted one had left, and DALI and the torchvision loader
  see the same samples in the same order. With augmentation the feed also gives each sample the crop window and flip
  that the torchvision loader draws for it (`transforms.train_crop`, from (seed, epoch, index)), for the image's
  upright size (EXIF orientation, `_upright_size`). So the crops repeat on resume too, and both loaders train on the
  same windows (pixels within resampling differences).
- evaluation: `fn.readers.file` without shuffling, each rank keeps its shard (`stick_to_shard`), the reader pads
  shards to equal length (`pad_last_batch`) and the iterator trims the padding (`LastBatchPolicy.PARTIAL`): over all
  ranks every file is yielded exactly once, and every rank iterates equally often, the last batch possibly short or
  empty.

Files are checked and `data.on_bad_file` applied before a loader is made (`build_loader`, checks.py); a file that
fails later (changed since, or refused by DALI's decoder alone) is a DataError naming it.
DALI is imported only when a loader is built, so `import fastft` stays light.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from fastft.data.checks import find_undecodable, open_regular, reason_of
from fastft.data.dali_pipeline import READER, GraphSpec, build_pipeline, import_dali
from fastft.data.sampler import ShardedBatchSampler, sample_seed, shard_range
from fastft.data.transforms import train_crop
from fastft.errors import DataError

if TYPE_CHECKING:
    import torch


class _TrainFeed:
    """The training pipeline's `external_source`: each call returns the next planned batch (encoded file bytes and
    labels) of `ShardedBatchSampler`'s batches, epoch after epoch, so prefetching runs on into the next epoch.

    DALI calls it from the thread that runs or resets the pipeline (sequential mode), in order, once per batch, so
    `fed` (what went in and has not been handed to the loader yet, oldest first) tells which batch comes out next
    and which files are in flight. `seek` re-plans the batches not yet fed. The loader holds the feed and the
    pipeline holds the feed, but the feed does not hold the loader (no reference cycle).
    """

    def __init__(
        self, paths: list[str], sampler, epoch: int, start_batch: int, *, crop_seed: int | None = None
    ) -> None:
        self.paths = paths
        self.crop_seed = crop_seed  # None: no augmentation; else each sample's crop and flip (`train_crop`)
        self.sampler = sampler
        self.length = len(sampler)
        # (epoch, its batches' (index, draw) pairs), cached; draw > 0 only for the balanced sampler's repeats
        self._epoch_batches: tuple[int, list[list[tuple[int, int]]]] | None = None
        self.fed: deque[tuple[int, int, list[str]]] = deque()
        self.pos = self._normal(epoch, start_batch)  # (epoch, batch) the next call feeds
        self._pool = None  # one reader thread, started on the first call
        self._ahead = None  # ((epoch, batch), future of its files' bytes): the next planned batch, being read

    def _normal(self, epoch: int, batch: int) -> tuple[int, int]:
        return (epoch, batch) if batch < self.length else (epoch + 1, 0)

    def _batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self.sampler.set_epoch(epoch)
            self._epoch_batches = (epoch, [[(it[0], it[2] if len(it) > 2 else 0) for it in b] for b in self.sampler])
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

    def _load(self, epoch: int, items: list[tuple[int, int]]) -> tuple:
        """One batch as the pipeline takes it: the files' bytes, the sample indices (B, 1) like the file reader's
        labels, and with augmentation each sample's crop anchor (top, left), crop shape (height, width) and flip.
        Reads only `paths` and `crop_seed`, which never change, so it may run in the read-ahead thread."""
        import numpy as np

        indices = [i for i, _ in items]
        paths = [self.paths[i] for i in indices]
        data = _read_files(paths)
        index = np.array([[i] for i in indices], dtype=np.int32)
        if self.crop_seed is None:
            return data, index
        anchors, shapes, flips = [], [], []
        for (i, draw), path, encoded in zip(items, paths, data, strict=True):
            width, height = _upright_size(encoded, path)
            top, left, h, w, flip = train_crop(width, height, sample_seed(self.crop_seed, epoch, i, draw))
            anchors.append(np.array([top, left], dtype=np.float32))
            shapes.append(np.array([h, w], dtype=np.float32))
            flips.append(np.array(int(flip), dtype=np.int32))
        return data, index, anchors, shapes, flips

    def __call__(self):
        pos = self.pos
        items = self._batches(pos[0])[pos[1]]
        if self._ahead is not None and self._ahead[0] == pos:
            batch = self._ahead[1].result()  # raises the DataError of a file it could not read
        else:  # the first batch, or a re-planned position
            batch = self._load(pos[0], items)
        self.fed.append((*pos, [self.paths[i] for i, _ in items]))
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


class _Targets:
    """The samples' targets by index: class indices as int64 (N,), or multi-hot rows as float32 (N, C); a copy per
    device the indices come on (the GPU pipeline's are on the GPU), made once."""

    def __init__(self, labels: list) -> None:
        import torch

        multilabel = bool(labels) and isinstance(labels[0], tuple)
        self.table = {"cpu": torch.tensor(labels, dtype=torch.float32 if multilabel else torch.long)}

    def of(self, index: torch.Tensor) -> torch.Tensor:
        key = str(index.device)
        if key not in self.table:
            self.table[key] = self.table["cpu"].to(index.device)
        return self.table[key][index.long()]


class DaliLoader:
    """Iterates (images, labels) batches of one rank's shard through a DALI pipeline.

    Training follows `ShardedBatchSampler(len(samples), batch_size, train=True, seed, shard_id, num_shards)`, the
    torchvision loader's sampler, and its crops and flips (`transforms.train_crop`): the same samples in the same
    order, cropped the same way, for a given (seed, epoch, start_batch, shard), whatever happened before (a resume
    included).

    Args:
        samples: (path, label) pairs, already checked (`build_loader` applies `data.on_bad_file`); the label mapping
            is the caller's. A label is a class index, or a multilabel sample's multi-hot tuple (batched as float32
            (B, C)).
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
        augment: False trains on shuffled full batches with the eval transform.
        balanced: training draws class-balanced batches (`ShardedBatchSampler` with the labels; data.sampler).
        interpolation: the weights preset's resize filter, "bilinear" or "bicubic" (torchvision's
            InterpolationMode values), for training crops and evaluation alike.

    Raises:
        ImportError: DALI is not installed.
        ConfigError: an argument value is invalid.
        DataError: no samples, or fewer samples than one training batch per shard.
    """

    def __init__(
        self,
        samples: list[tuple[str, int | tuple[int, ...]]],
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
        augment: bool = True,
        interpolation: str = "bilinear",
        balanced: bool = False,
    ) -> None:
        import_dali()  # fail early with the install hint
        self.graph = GraphSpec(
            train=train,
            augment=augment,
            batch_size=batch_size,
            crop_size=crop_size,
            resize_size=resize_size,
            mean=tuple(mean),
            std=tuple(std),
            interpolation=interpolation,
            shard_id=shard_id,
            num_shards=num_shards,
            threads=threads,
            prefetch=prefetch,
            seed=seed,
            device=device,
            device_id=device_id,
            hw_decoder_load=hw_decoder_load,
        )
        self.samples = [(str(p), y if isinstance(y, tuple) else int(y)) for p, y in samples]
        self.paths = [p for p, _ in self.samples]
        self._targets = _Targets([y for _, y in self.samples])
        self.balanced = balanced
        self.skipped: list[str] = []  # the bad-file policy is applied before a loader is made (build_loader)
        self.epoch, self.start_batch = 0, 0
        self._sampler, self._len, self._num_samples = self._plan()
        self._iterator = None  # built on first iteration: building starts decoding in background threads
        self._feed: _TrainFeed | None = None  # training: what the pipeline is fed, built with the iterator
        self._dali_len = 0  # evaluation: batches DALI produces per epoch on this rank, padding included
        self._consumed = 0  # evaluation: batches taken from DALI in the current epoch

    def _plan(self) -> tuple[ShardedBatchSampler | None, int, int]:
        """(training sampler, batches per epoch, real samples per epoch) of this shard."""
        g, n = self.graph, len(self.samples)
        if n == 0:
            raise DataError("no readable image files to load")
        if n < g.num_shards:
            raise DataError(f"{n} samples cannot be split over {g.num_shards} shards (each shard needs at least one)")
        if not g.train:
            # Shards differ by at most one sample; every rank iterates as often as the largest needs.
            length = math.ceil(math.ceil(n / g.num_shards) / g.batch_size)
            return None, length, len(shard_range(n, g.shard_id, g.num_shards))
        # Full batches only, and the same count on every rank: each rank gets N // num_shards samples.
        labels = [y for _, y in self.samples] if self.balanced else None
        sampler = ShardedBatchSampler(
            n, g.batch_size, train=True, seed=g.seed, rank=g.shard_id, world=g.num_shards, labels=labels
        )
        if len(sampler) == 0:
            raise DataError(
                f"{n} training samples over {g.num_shards} shard(s) give less than one batch of {g.batch_size} "
                "per shard"
            )
        return sampler, len(sampler), len(sampler) * g.batch_size

    @property
    def train(self) -> bool:
        return self.graph.train

    @property
    def prefetch(self) -> int:
        """Batches the pipeline keeps in flight."""
        return self.graph.prefetch

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
        # DALI gives the sample indices as int32 (B, 1); a (0, ...) slice is an empty last batch, yielded as is.
        return out["images"], self._targets.of(out["index"].reshape(-1))

    def _reset(self, it) -> None:
        it.reset()
        self._consumed = 0

    def _get_iterator(self):
        if self._iterator is None:
            self._iterator = self._open_train() if self.train else self._open_eval()
        return self._iterator

    def _open_train(self):
        g = self.graph
        # The feed starts where the next iteration starts, so the batches built and prefetched now are used.
        self._feed = _TrainFeed(
            self.paths, self._sampler, self.epoch, self.start_batch, crop_seed=g.seed if g.crops_in_feed else None
        )
        try:
            # No reader and no epoch end: the feed runs on through the epochs, and __iter__ takes len() batches.
            return self._iterate(build_pipeline(g, feed=self._feed))
        except BaseException:
            self._drop_feed()
            raise

    def _open_eval(self):
        _, _, _, _, LastBatchPolicy = import_dali()
        # PARTIAL: DALI trims the padding, so a last batch may be short or empty.
        it = self._iterate(
            build_pipeline(self.graph, paths=self.paths),
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.PARTIAL,
        )
        self._dali_len = len(it)
        if self._dali_len < self._len:
            raise RuntimeError(f"DALI plans {self._dali_len} batches per epoch, expected at least {self._len}")
        return it

    def _iterate(self, pipe, **kwargs):
        """A DALIGenericIterator over `pipe`; it decodes the first batch while it is built, so a DALI failure to read
        a file becomes a DataError naming it here."""
        _, _, _, DALIGenericIterator, _ = import_dali()
        try:
            return DALIGenericIterator([pipe], ["images", "index"], auto_reset=False, **kwargs)
        except RuntimeError as e:
            error = self._data_error(e)
            if error is None:
                raise
            raise error from None

    def _data_error(self, err: RuntimeError) -> DataError | None:
        """Turns a DALI failure to read or decode a file into a one-line DataError naming the file when possible.

        Returns None for failures elsewhere in the pipeline (e.g. out of memory): those are not data errors.
        """
        message = str(err)
        if not any(op in message for op in ("fn.readers.file", "fn.decoders.image")):
            return None
        named = [path for path in self.paths if path in message]
        if named:
            return DataError(f"unreadable image file {max(named, key=len)}: DALI could not read or decode it")
        # DALI did not name the file: decode the files this rank reads with PIL to find it (error path only).
        paths = self.paths
        if self._feed is not None:  # training: the batches in flight hold it (then, to be safe, the rest)
            in_flight = [path for _, _, batch in self._feed.fed for path in batch]
            first = set(in_flight)
            paths = in_flight + [p for p in paths if p not in first]
        else:  # evaluation shards are fixed
            paths = [paths[i] for i in shard_range(len(paths), self.graph.shard_id, self.graph.num_shards)]
        found = find_undecodable(paths, threads=max(4, self.graph.threads))
        if found is not None:
            return DataError(f"unreadable image file {found[0]}: {found[1]}")
        lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "fail" in ln.lower()), lines[0] if lines else "unknown error")
        return DataError(f"DALI failed to read or decode an image: {detail}")
