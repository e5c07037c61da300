"""Frozen-feature cache: run the frozen prefix once, train every later epoch from its stored outputs.

Each rank computes the features of its own contiguous shard (no work duplicated) into one table file per node: the
ranks of a node write their rows straight into it, the rows computed on other nodes are sent to the node once (CPU,
rank to rank, in chunks) and every rank memory-maps the whole table read-only. So a node holds one copy in host
memory however many ranks it runs, nothing is gathered onto a GPU (batches move to the device step by step), and
training samples exactly the same batches as uncached training in any world size. Memory: the file lives in
/dev/shm and is unlinked once mapped. Disk: it lives in `cache_dir/<key>/`, which may be node-local (each node ends
with the whole table) or shared (one copy, written once). Training augmentation is either off (the eval transform)
or `features.views = K` fixed augmented views per image, view `epoch % K` being used in epoch `epoch`.

The disk cache is keyed by everything that determines the features (see `fingerprint`) and the table has a manifest
written last with its byte size and SHA-256: a stale, truncated or half-written cache is detected and rebuilt, never
silently used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastft.data.index import Sample
from fastft.data.sampler import ShardedBatchSampler
from fastft.data.torch_loader import ImageDataset, batch_loader, shutdown_workers
from fastft.data.transforms import TransformSpec
from fastft.parallel.env import DistEnv, all_gather_object, barrier, cpu_group
from fastft.precision import Precision

log = logging.getLogger("fastft")

_NP_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass
class FeatureTable:
    """Table parts `parts[i]`: (V, n_i, *shape) with V = max(views, 1), rows starts[i]..; labels: (N,), or (N, C)
    multi-hot for a multilabel task (data/multilabel.py: a sample's label is its multi-hot tuple). The cache
    builds one part, the whole memory-mapped table."""

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


# Bump when the stored layout or what a key covers changes (3: image features computed with BatchNorm folded).
CACHE_FORMAT = 3


def fingerprint(
    prefix: nn.Module,
    samples: list[Sample],
    spec: TransformSpec,
    *,
    views: int,
    dtype: str,
    train: bool,
    seed: int = 0,
    precision: str = "fp32",
    channels_last: bool = False,
    model: dict | None = None,
    data: str | None = None,
) -> str:
    """A key over everything that determines the cached features: the prefix (its architecture, which also fixes
    the frozen cut, and every weight and buffer, so the weights file's content), the preprocessing, the views and,
    when they are augmented, the run seed (it seeds each view's augmentation), the compute precision, the storage
    dtype, the memory layout, the fastft and torch versions, and the file list with sizes and mtimes (or `data`: a
    source's own key over its rows, e.g. a text file's bytes and tokens)."""
    import fastft

    h = hashlib.sha256()
    desc = {
        "format": CACHE_FORMAT,
        "fastft": fastft.__version__,
        "torch": torch.__version__,
        "spec": spec.to_dict(),
        "views": views,
        "seed": seed if views > 0 else None,  # the eval transform draws nothing from the seed
        "dtype": dtype,
        "precision": precision,
        "channels_last": channels_last,
        "train": train,
        "prefix": repr(prefix),
        "model": model or {},
    }
    h.update(json.dumps(desc, sort_keys=True, default=str).encode())
    for name, t in sorted(prefix.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if data is not None:
        h.update(f"data\0{data}".encode())
        return h.hexdigest()[:24]
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
        self.samples, self.spec, self.views, self.seed = samples, spec, views, seed
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
        if isinstance(images, dict):  # a text source's token tensors
            images = {k: v.to(env.device, non_blocking=True) for k, v in images.items()}
        else:
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


def _feature_shape(prefix: nn.Module, source, env: DistEnv, precision: Precision) -> tuple[int, ...]:
    """The prefix's output shape for one input: a blank image of the spec's crop, or the source's own example."""
    if hasattr(source, "example"):
        x = source.example(env.device)
    else:
        x = torch.zeros(1, 3, source.spec.crop_size, source.spec.crop_size, device=env.device)
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
    model: dict | None = None,
    runner: Callable[[], nn.Module] | None = None,
) -> FeatureTable:
    """Compute (or reuse from disk) the prefix features of `source`'s images; see the module docstring.

    `cache_dir` may name environment variables (`/scratch/$SLURM_JOB_ID`, `/local/node$GROUP_RANK`): node-local
    folders are fine, each ends with the whole table. `model` adds fields to the key (e.g. the model's name).
    `runner` makes what computes the features in `prefix`'s place (the same function: fastft.fold_bn's folded
    prefix), called only when a table is built; the key and the shape are always `prefix`'s."""
    samples, spec, views = source.samples, source.spec, source.views
    n, V = len(samples), max(views, 1)
    labels = torch.tensor([y for _, y in samples], dtype=torch.long)
    np_dtype = _NP_DTYPES[dtype]
    full = (V, n, *_feature_shape(prefix, source, env, precision))
    cache_dir = Path(os.path.expandvars(str(cache_dir))).expanduser()
    if mode == "memory":
        folder, name = _memory_folder(cache_dir, int(np.prod(full)) * np.dtype(np_dtype).itemsize), None
    else:
        key = fingerprint(
            prefix,
            samples,
            spec,
            views=views,
            dtype=dtype,
            train=train,
            seed=source.seed,
            precision=precision.name,
            channels_last=channels_last,
            model=model,
            data=getattr(source, "data_key", None),
        )
        folder, name = cache_dir / key, "table.npy"
    folder.mkdir(parents=True, exist_ok=True)
    token = all_gather_object(env, uuid.uuid4().hex[:16])[0]  # one name per call, the same on every rank
    layout = _layout(env, folder, token)
    path = folder / (name or f".fastft-features-{token}.npy")
    writer = env.rank == layout.writer_of(env.rank)
    try:
        built, table = _build_or_reuse(
            runner or (lambda: prefix),
            source,
            folder,
            path,
            layout,
            token,
            mode=mode,
            dtype=dtype,
            full=full,
            env=env,
            events=events,
            precision=precision,
            channels_last=channels_last,
        )
    finally:  # on success and on failure: nothing is left behind but a complete disk table
        if writer and mode == "memory":  # mapped by every rank (or failed): the file goes, its pages stay mapped
            path.unlink(missing_ok=True)
        elif writer:  # a disk build that failed before its rename into place
            (folder / f".table-{token}-{env.rank}.npy").unlink(missing_ok=True)
    return FeatureTable([table], [0], labels, views, "built" if built else "disk")


def _build_or_reuse(
    make, source, folder: Path, path: Path, layout, token: str, *, mode, dtype, full, env: DistEnv, events, **common
) -> tuple[bool, torch.Tensor]:
    """Check (disk), build when needed (through the module `make()` returns), then map the table: (built, table)."""
    np_dtype = _NP_DTYPES[dtype]
    meta_path = path.with_suffix(".json")
    writer = env.rank == layout.writer_of(env.rank)
    built = True
    if mode != "memory":
        reason = _check_shard(path, meta_path, full, np_dtype) if writer else None
        reasons = all_gather_object(env, reason)
        built = any(reasons[w] is not None for w in layout.writers)  # any copy stale: rebuild them all
        if built and reason not in (None, "missing"):
            log.warning("fastft: feature cache %s is %s; rebuilding it", path, reason)
            if events is not None:
                events("feature_cache_invalid", path=str(path), reason=reason)
    if built:
        # Disk: built under a name of its own, renamed into place when complete, so a crash never leaves a partial
        # table.npy and two writers that failed to see they share a folder each publish a whole, identical table.
        work = path if mode == "memory" else folder / f".table-{token}-{layout.writer_of(env.rank)}.npy"
        _fill(make(), source, work, layout, full=full, np_dtype=np_dtype, env=env, **common)
        if mode != "memory" and writer:
            meta_path.unlink(missing_ok=True)  # the manifest goes first: a crash leaves no valid cache
            os.replace(work, path)
            _write_manifest(path, meta_path, full, dtype, folder.name)
        barrier(env)
    # Memory-mapped, read-only in effect (copy-on-write gives torch a writable view; nothing writes it): the ranks
    # that share a copy share its pages, one copy per node in host memory.
    table = torch.from_numpy(np.load(path, mmap_mode="c"))
    if mode == "memory":
        barrier(env)  # every rank has mapped the file before it goes
    return built, table


@dataclass
class _Layout:
    """Who holds which copy of the table. A copy is one file in one folder as the ranks see it: a node-local folder
    (or /dev/shm) gives one copy per node, a shared folder one copy for the job. Per rank: the writer of its copy
    (its lowest rank, which creates and completes it) and whether it writes its own rows straight into the file
    (same node as the writer) or sends them to the writer."""

    copy_of: list[int]
    direct: list[bool]

    @property
    def writers(self) -> list[int]:
        return sorted(set(self.copy_of))

    def writer_of(self, rank: int) -> int:
        return self.copy_of[rank]


def _layout(env: DistEnv, folder: Path, token: str) -> _Layout:
    """Find which ranks see the same folder: each leaves a probe file there and lists the others' (collective)."""
    probe = folder / f".fastft-probe-{token}-{env.rank}"
    probe.touch()
    barrier(env)
    seen = [int(p.name.rsplit("-", 1)[1]) for p in folder.glob(f".fastft-probe-{token}-*")]
    infos = all_gather_object(env, (min(seen), env.node_rank))  # also the point after which every rank has listed
    probe.unlink()
    copy_of = [w for w, _ in infos]
    return _Layout(copy_of, [infos[r][1] == infos[copy_of[r]][1] for r in range(env.world_size)])


def _memory_folder(cache_dir: Path, nbytes: int) -> Path:
    """/dev/shm (node-local shared memory) when it has room for the table, else the cache folder (node-local or not,
    the ranks that see it share one copy)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > nbytes + (256 << 20):
        return shm
    log.info("fastft: /dev/shm has no room for the %.1f GB feature table: it goes to %s", nbytes / 1e9, cache_dir)
    return cache_dir


def _fill(prefix, source, path: Path, layout: _Layout, *, full, np_dtype, env: DistEnv, **common) -> None:
    """Compute this rank's rows into its copy (or a private array, sent on), then complete every copy with the rows
    it lacks, sent once from the rank that computed them (collective)."""
    if env.rank == layout.writer_of(env.rank):
        np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=full).flush()
    barrier(env)
    lo, hi = _shard_bounds(full[1], env.rank, env.world_size)
    table = np.load(path, mmap_mode="r+") if layout.direct[env.rank] else None
    mine = table[:, lo:hi] if table is not None else np.zeros((full[0], hi - lo, *full[2:]), dtype=np_dtype)
    _compute_shard(prefix, source, allocate=lambda _: mine, env=env, **common)
    _exchange(env, layout, full, mine, table)
    if table is not None:
        table.flush()
        del table
    barrier(env)


def _exchange(env: DistEnv, layout: _Layout, full, mine: np.ndarray, table: np.ndarray | None) -> None:
    """Send each copy the rows its own node did not compute, rank to rank over a CPU (gloo) group, in chunks of at
    most ~64 MB. Every rank walks the same list of transfers in the same order, so sends and receives pair up."""
    if not env.distributed:
        return
    import torch.distributed as dist

    group = cpu_group(env)
    row_bytes = int(np.prod(full[2:])) * mine.dtype.itemsize * full[0]
    step = max(1, (64 << 20) // max(row_bytes, 1))
    for w in layout.writers:
        for r in range(env.world_size):
            if (layout.writer_of(r) == w and layout.direct[r]) or env.rank not in (r, w):
                continue
            lo, hi = _shard_bounds(full[1], r, env.world_size)
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                if env.rank == r:
                    chunk = np.ascontiguousarray(mine[:, a - lo : b - lo])
                    dist.send(torch.from_numpy(chunk.reshape(-1).view(np.uint8)), dst=w, group=group)
                else:
                    buf = torch.empty((b - a) * row_bytes, dtype=torch.uint8)
                    dist.recv(buf, src=r, group=group)
                    table[:, a:b] = buf.numpy().view(mine.dtype).reshape(full[0], b - a, *full[2:])


def _write_manifest(path: Path, meta_path: Path, full, dtype: str, key: str) -> None:
    meta = {"shape": list(full), "dtype": dtype, "bytes": path.stat().st_size, "sha256": _sha256_file(path), "key": key}
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)


def _check_shard(path: Path, meta_path: Path, shape: tuple[int, ...], dtype) -> str | None:
    """None when the table file is complete and intact; otherwise why not."""
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
        balanced: bool = False,
    ) -> None:
        self.table = table
        labels = table.labels.tolist() if balanced else None  # data.sampler = balanced: draws by these
        self.sampler = ShardedBatchSampler(
            table.num_samples, batch_size, train=train, seed=seed, rank=rank, world=world, labels=labels
        )
        self.out_dtype = out_dtype

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        views = max(self.table.views, 1) if self.sampler.train else 1
        for batch in self.sampler:
            idx = torch.tensor([item[0] for item in batch], dtype=torch.long)
            # The epoch's view; a balanced sampler's repeat (draw d) reads the d-th next view, as the image loaders
            # give each repeat its own crop.
            view = torch.tensor([self.sampler.epoch + (item[2] if len(item) > 2 else 0) for item in batch]) % views
            yield self._take(view, idx).to(self.out_dtype), self.table.labels[idx]

    def _take(self, view: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        first = int(view[0]) if len(view) else 0
        if bool((view == first).all()):
            return self.table.take(first, idx)
        out = torch.empty((len(idx), *self.table.parts[0].shape[2:]), dtype=self.table.parts[0].dtype)
        for v in view.unique().tolist():
            m = view == v
            out[m] = self.table.take(v, idx[m])
        return out
