"""Frozen-feature cache: run the frozen prefix once, train every later epoch from its stored outputs.

Each rank computes the features of its own contiguous shard (no work duplicated), then every rank sees the whole
table (memory: all-gathered; disk: every rank memory-maps every shard file), so training samples exactly the same
batches as uncached training in any world size. Training augmentation is either off (the eval transform) or
`features.views = K` fixed augmented views per image, view `epoch % K` being used in epoch `epoch`.

The disk cache is keyed by everything that determines the features (prefix weights, transform, views, the file list
with sizes and mtimes, dtype) and each shard has a manifest written last with its byte size and SHA-256: a stale,
truncated or half-written cache is detected and rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastft.data.folder import Sample
from fastft.data.torch_loader import ImageDataset, ShardedBatchSampler, batch_loader, shutdown_workers
from fastft.data.transforms import TransformSpec
from fastft.parallel.env import DistEnv, barrier
from fastft.precision import Precision

log = logging.getLogger("fastft")

_NP_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass
class FeatureTable:
    """Rank shards `parts[r]`: (V, n_r, *shape) with V = max(views, 1), rows starts[r]..; labels: (N,)."""

    parts: list[torch.Tensor]
    starts: list[int]
    labels: torch.Tensor
    views: int
    source: str  # "built" | "disk" (reused)

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def take(self, view: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (global indices) of one view, gathered across shards without concatenating them (a
        memory-mapped table larger than RAM stays on disk)."""
        if len(self.parts) == 1:
            return self.parts[0][view][idx]
        out = torch.empty((len(idx), *self.parts[0].shape[2:]), dtype=self.parts[0].dtype)
        for part, lo in zip(self.parts, self.starts):
            m = (idx >= lo) & (idx < lo + part.shape[1])
            if m.any():
                out[m] = part[view][idx[m] - lo]
        return out


def fingerprint(
    prefix: nn.Module, samples: list[Sample], spec: TransformSpec, *, views: int, dtype: str, train: bool
) -> str:
    """A key over everything that determines the cached features."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"spec": spec.to_dict(), "views": views, "dtype": dtype, "train": train, "prefix": type(prefix).__name__},
            sort_keys=True,
        ).encode()
    )
    for name, t in sorted(prefix.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


class ImageSource:
    """The images one rank computes features from: its contiguous shard of `samples`, in order, view by view (view v
    is the training augmentation seeded as epoch v; views = 0: one pass of the eval transform).

    Its workers persist across views, and `start()` begins decoding view 0 right away, so the decode of the first
    batches overlaps whatever the caller does before the compute (building the model)."""

    def __init__(
        self,
        samples: list[Sample],
        spec: TransformSpec,
        *,
        views: int,
        env: DistEnv,
        batch_size: int,
        workers: int,
        seed: int,
    ) -> None:
        self.samples, self.spec, self.views = samples, spec, views
        self.dataset = ImageDataset(samples, spec, train=views > 0, seed=seed)
        self.sampler = ShardedBatchSampler(len(samples), batch_size, train=False, rank=env.rank, world=env.world_size)
        self.loader = batch_loader(self.dataset, self.sampler, workers=workers, seed=seed)
        self._started = None

    def start(self) -> None:
        if self._started is None:
            self.sampler.set_epoch(0)
            self._started = iter(self.loader)

    def close(self) -> None:
        started, self._started = self._started, None
        shutdown_workers(self.loader, started)

    def batches(self):
        """(view, images) for every batch of this rank's shard, view by view; then the workers are released."""
        for v in range(max(self.views, 1)):
            if v == 0 and self._started is not None:
                it, self._started = self._started, None
            else:
                self.sampler.set_epoch(v)  # the view id plays the epoch's role in the per-sample augmentation seed
                it = iter(self.loader)
            for images, _ in it:
                yield v, images
        self.close()


def _compute_shard(
    prefix: nn.Module,
    source: ImageSource,
    *,
    env: DistEnv,
    precision: Precision,
    channels_last: bool,
    allocate,
) -> np.ndarray | None:
    """Fill allocate(feature shape)[v, i - lo] with the prefix outputs of this rank's shard, view by view; the array
    is allocated when the first batch's features give their shape (None when the shard is empty)."""
    prefix.eval()
    out, pos, view = None, 0, 0
    for v, images in source.batches():
        if v != view:
            view, pos = v, 0
        images = images.to(env.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), precision.autocast():
            f = prefix(images)
        if out is None:
            out = allocate(tuple(f.shape[1:]))
        out[v, pos : pos + f.shape[0]] = f.float().cpu().numpy()
        pos += f.shape[0]
    return out


def _feature_shape(prefix: nn.Module, spec: TransformSpec, env: DistEnv, precision: Precision) -> tuple[int, ...]:
    x = torch.zeros(1, 3, spec.crop_size, spec.crop_size, device=env.device)
    prefix.eval()
    with torch.inference_mode(), precision.autocast():
        return tuple(prefix(x).shape[1:])


def build_features(
    prefix: nn.Module,
    source: ImageSource,
    *,
    mode: str,
    dtype: str,
    cache_dir: Path,
    env: DistEnv,
    precision: Precision,
    channels_last: bool,
    train: bool,
    events=None,
) -> FeatureTable:
    """Compute (or reuse from disk) the prefix features of `source`'s images; see the module docstring."""
    samples, spec, views = source.samples, source.spec, source.views
    n, V = len(samples), max(views, 1)
    labels = torch.tensor([y for _, y in samples], dtype=torch.long)
    np_dtype = _NP_DTYPES[dtype]
    lo, hi = _shard_bounds(n, env.rank, env.world_size)
    common = {"env": env, "precision": precision, "channels_last": channels_last}

    if mode == "memory":
        mine = _compute_shard(
            prefix, source, allocate=lambda shape: np.zeros((V, hi - lo, *shape), dtype=np_dtype), **common
        )
        if mine is None:  # an empty shard (more ranks than images) still has the table's shape
            mine = np.zeros((V, 0, *_feature_shape(prefix, spec, env, precision)), dtype=np_dtype)
        feats = _all_gather_shards(torch.from_numpy(mine), n, env)
        return FeatureTable([feats], [0], labels, views, "built")

    key = fingerprint(prefix, samples, spec, views=views, dtype=dtype, train=train)
    folder = cache_dir / key
    folder.mkdir(parents=True, exist_ok=True)
    shard_path = folder / f"shard-{env.rank}-of-{env.world_size}.npy"
    meta_path = shard_path.with_suffix(".json")
    shape = _feature_shape(prefix, spec, env, precision)
    reason = _check_shard(shard_path, meta_path, (V, hi - lo, *shape), np_dtype)
    built = reason is not None
    if built:
        if reason != "missing":
            log.warning("fastft: feature cache %s is %s; rebuilding it", shard_path, reason)
            if events is not None:
                events("feature_cache_invalid", path=str(shard_path), reason=reason)
        meta_path.unlink(missing_ok=True)  # the manifest goes first, so a crash mid-write leaves no valid cache
        arr = np.lib.format.open_memmap(shard_path, mode="w+", dtype=np_dtype, shape=(V, hi - lo, *shape))
        _compute_shard(prefix, source, allocate=lambda _: arr, **common)
        arr.flush()
        del arr
        meta = {
            "shape": [V, hi - lo, *shape],
            "dtype": dtype,
            "bytes": shard_path.stat().st_size,
            "sha256": _sha256_file(shard_path),
            "key": key,
        }
        tmp = meta_path.with_name(f".{meta_path.name}.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, meta_path)
    barrier(env)
    parts, starts = [], []
    for r in range(env.world_size):
        p = folder / f"shard-{r}-of-{env.world_size}.npy"
        # Memory-mapped (copy-on-write so torch gets a writable view; the file is never modified).
        parts.append(torch.from_numpy(np.load(p, mmap_mode="c")))
        starts.append(_shard_bounds(n, r, env.world_size)[0])
    return FeatureTable(parts, starts, labels, views, "built" if built else "disk")


def _check_shard(path: Path, meta_path: Path, shape: tuple[int, ...], dtype) -> str | None:
    """None when the shard is complete and intact; otherwise why not."""
    if not path.exists() or not meta_path.exists():
        return "missing"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return "unreadable (bad manifest)"
    if tuple(meta.get("shape", ())) != shape:
        return f"stale (shape {meta.get('shape')} != {list(shape)})"
    size = path.stat().st_size
    if size != meta.get("bytes"):
        return f"truncated ({size} bytes, expected {meta.get('bytes')})"
    if _sha256_file(path) != meta.get("sha256"):
        return "corrupt (checksum mismatch)"
    return None


def _all_gather_shards(mine: torch.Tensor, n: int, env: DistEnv) -> torch.Tensor:
    """Concatenate every rank's (V, n_r, ...) shard along dim 1 (shards differ by at most one row)."""
    if not env.distributed:
        return mine
    import torch.distributed as dist

    size = -(-n // env.world_size)
    padded = torch.zeros((mine.shape[0], size, *mine.shape[2:]), dtype=mine.dtype)
    padded[:, : mine.shape[1]] = mine
    comm_dev = env.device if env.device.type == "cuda" else torch.device("cpu")
    # gloo has no fp16 all_gather on every platform: move as fp32 on CPU, keep the stored dtype after.
    send = padded.to(comm_dev, torch.float32 if comm_dev.type == "cpu" else padded.dtype)
    bufs = [torch.empty_like(send) for _ in range(env.world_size)]
    dist.all_gather(bufs, send)
    parts = []
    for r, b in enumerate(bufs):
        lo, hi = _shard_bounds(n, r, env.world_size)
        parts.append(b[:, : hi - lo].to("cpu", mine.dtype))
    return torch.cat(parts, dim=1)


class FeatureLoader:
    """Batches of (features, labels) from a FeatureTable with the same sampling as the image loaders."""

    def __init__(
        self,
        table: FeatureTable,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        rank: int,
        world: int,
        out_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.table = table
        self.sampler = ShardedBatchSampler(
            table.num_samples, batch_size, train=train, seed=seed, rank=rank, world=world
        )
        self.out_dtype = out_dtype

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        view = self.sampler.epoch % max(self.table.views, 1) if self.sampler.train else 0
        for batch in self.sampler:
            idx = torch.tensor([i for i, _ in batch], dtype=torch.long)
            yield self.table.take(view, idx).to(self.out_dtype), self.table.labels[idx]
