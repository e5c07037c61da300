"""Throughput harness: images/s and a per-step time breakdown of fastft's modes, beside the hardware limit and the
naive seed baseline, all measured in one run.

    make bench                                          # = python -m benchmarks.throughput --suite cpu
    python -m benchmarks.throughput --suite gpu --out DIR
    fastft bench --suite cpu                            # the same harness through the CLI

Method
- Every mode is one in-process `fastft.train.finetune(cfg)` call with `log.step_timing = true` (the loop's own
  StepTimer synchronises the device at each boundary) over `warmup_epochs + repeats` epochs; the first epoch is
  warm-up and is not counted; the figure is the median images/s of the timed epochs, their min and max the spread.
  World sizes > 1 run the same call under torchrun (gloo on CPU, nccl on GPU).
- The per-step breakdown (ms per step) is the median over timed epochs of each StepTimer segment: data wait, frozen
  forward, trainable forward+backward, optimizer, plus the residual `other` (scheduler, logging, loader tail).
  `communication` is the gradient all-reduce of the trainable parameters timed standalone on the same process
  group (world > 1 only): in the real step DDP overlaps it with the backward pass, inside `trainable`.
- The limit: forward-only images/s of the same backbone (torchvision, eval, inference_mode, channels_last, the same
  autocast) on one in-memory synthetic batch at the same batch size, precision and resolution, measured just before
  and just after each mode (the median of both measurements' repeats), so load on a shared machine hits both sides.
- The baseline: `benchmarks/baseline_seed.py` (the article's plain loop) on the same JPEGs at the same batch size.
- Ratios (to the limit, to the baseline) are only ever taken between measurements of the same run (same run_id).

Writes `<hardware>-<date>.json` and `.md` (stamped with the command, config, versions, CPU/GPU model and count) and
`LATEST.md` (the README's table section) into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks import data_bench
from benchmarks.baseline_seed import run_seed

SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parents[1]
STEP_SEGMENTS = ("data", "frozen", "trainable", "optimizer")  # fastft.timing.SEGMENTS
BREAKDOWN = (*STEP_SEGMENTS, "communication", "other")
FREEZE = {"linear": "backbone", "partial": None, "full": "none"}  # partial: Settings.partial_freeze

# The JSON schema, as the keys every document / entry must have (tests hold the harness to it).
REQUIRED_KEYS = {
    "document": ("schema_version", "benchmark", "run_id", "suite", "date", "command", "hardware", "versions",
                 "settings", "limit_measurements", "limits", "baselines", "cases", "headline", "targets", "wall_s"),
    "hardware": ("hostname", "cpu_model", "cpu_count", "cores_available", "gpu_model", "gpu_count", "device"),
    "limit": ("key", "run_id", "model", "precision", "batch_size", "image_size", "images_per_s", "spread",
              "repeats_images_per_s", "warmup_iters", "iters_per_repeat"),
    "limit_measurement": ("id", "when", "key", "run_id", "images_per_s", "repeats_images_per_s"),
    "baseline": ("model", "run_id", "images_per_s", "spread", "epochs_images_per_s", "warmup_epochs", "total_s"),
    "case": ("name", "status", "config"),
    "case_ok": ("run_id", "precision", "compile_target", "images_per_s", "spread", "epochs_images_per_s",
                "first_epoch_images_per_s", "warmup_epochs", "breakdown_ms_per_step", "limit_key", "limit_ids",
                "limit_images_per_s", "ratio_to_limit", "ratio_to_baseline", "wall_s"),
    "target": ("name", "description", "threshold", "value", "met"),
    "headline": ("model", "epochs", "train_images", "val_images", "batch_size", "image_size", "first_epochs",
                 "fastft_cached", "baseline", "time_ratio_fastft_over_baseline"),
    "first_epoch": ("name", "run_id", "loader", "image_size", "images_per_s", "spread", "repeats", "limit_key",
                    "limit_ids", "limit_images_per_s", "ratio_to_limit", "breakdown_s"),
}


# --------------------------------------------------------------------------------------------------------------------
# What a suite measures


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    mode: str = "linear"  # linear | partial | full
    loader: str = "synthetic"  # synthetic (in memory) | torch | dali
    precision: str = "auto"  # fastft precision.dtype
    compile: str = "none"  # fastft compile.target: none | head | all
    channels_last: bool = True
    cache: str = "off"  # off | memory
    world: int = 1


@dataclass
class Settings:
    batch_size: int
    image_size: int  # 0 = the weights' preset crop
    workers: int
    train_images: int  # the modes' data: photo-like JPEGs (data_bench), root/train + root/val
    val_images: int
    warmup_epochs: int = 1
    repeats: int = 3  # timed epochs per mode
    limit_warmup: int = 2
    limit_iters: int = 2  # batches per limit repeat
    limit_repeats: int = 3
    limit_first_warmup_s: float = 5.0  # extra warm-up (seconds) for the first limit measurement of each key
    device: str = "auto"
    partial_freeze: str = "until:layer3"


@dataclass
class Block:
    model: str
    cases: list[Case]
    baseline_epochs: int = 0  # > 0: time the seed loop for this many epochs (first = warm-up); 0: take the headline's


@dataclass
class Headline:
    """The side-by-side run: the linear probe's first epoch vs the limit, and a cached N-epoch linear probe vs the
    seed loop (wall time of the whole call, cache build and final evaluation included) on the same JPEGs."""

    model: str
    epochs: int
    train_images: int
    val_images: int
    preset_first_epoch: bool = True  # also time a first epoch at the weights' preset size when the suite uses another
    first_epoch_repeats: int = 5
    dali_first_epoch: bool = True  # also time the first epoch on DALI when installed and `auto` picks another loader


@dataclass
class Suite:
    name: str
    settings: Settings
    blocks: list[Block]
    headline: Headline | None = None
    notes: list[str] = field(default_factory=list)


def _lp(model: str, **kw) -> list[Case]:
    return [Case(f"linear/{k}", model, **v, **kw) for k, v in (
        ("synthetic", {}), ("torchvision", {"loader": "torch"}), ("dali", {"loader": "dali"}),
        ("cache", {"loader": "torch", "cache": "memory"}))]


def make_suite(name: str) -> Suite:
    if name == "cpu":
        r18 = [*_lp("resnet18"), Case("partial/synthetic", "resnet18", "partial"),
               Case("full/synthetic", "resnet18", "full"),
               Case("linear/synthetic fp32", "resnet18", precision="fp32"),
               Case("linear/synthetic compile head", "resnet18", compile="head"),
               Case("linear/synthetic NCHW", "resnet18", channels_last=False),
               Case("linear/synthetic world 2", "resnet18", world=2)]
        r50 = [*_lp("resnet50"), Case("partial/synthetic", "resnet50", "partial"),
               Case("full/synthetic", "resnet50", "full")]
        return Suite("cpu", Settings(batch_size=32, image_size=128, workers=2, train_images=96, val_images=32,
                                     device="cpu"),
                     [Block("resnet18", r18, baseline_epochs=4), Block("resnet50", r50)],
                     Headline("resnet50", epochs=10, train_images=224, val_images=32),
                     notes=[("128 px crops (not 224) so that the suite, the 10-epoch fp32 seed loop included, fits in "
                            "15 minutes on 2 cores; every ratio compares like with like at that size.")])
    if name == "gpu":
        # Compiled modes last: their compile time is the one cost that can run into the time budget.
        cases = [Case("linear/synthetic", "resnet50", precision="bf16"),
                 Case("linear/dali", "resnet50", loader="dali", precision="bf16"),
                 Case("linear/torchvision", "resnet50", loader="torch", precision="bf16"),
                 Case("linear/cache", "resnet50", loader="dali", precision="bf16", cache="memory"),
                 Case("partial/synthetic", "resnet50", "partial", precision="bf16"),
                 Case("full/synthetic", "resnet50", "full", precision="bf16"),
                 Case("full/dali", "resnet50", "full", loader="dali", precision="bf16"),
                 Case("linear/synthetic compile all", "resnet50", precision="bf16", compile="all"),
                 Case("full/synthetic compile head", "resnet50", "full", precision="bf16", compile="head")]
        workers = max(1, min(16, len(os.sched_getaffinity(0)) - 1))
        return Suite("gpu", Settings(batch_size=256, image_size=0, workers=workers, train_images=4096, val_images=512,
                                     limit_warmup=5, limit_iters=10, limit_first_warmup_s=3.0, device="cuda"),
                     [Block("resnet50", cases, baseline_epochs=3)],
                     Headline("resnet50", epochs=10, train_images=4096, val_images=512))
    if name == "smoke":
        return Suite("smoke", Settings(batch_size=8, image_size=32, workers=0, train_images=16, val_images=8,
                                       limit_warmup=1, limit_iters=1, limit_first_warmup_s=0.0, device="cpu"),
                     [Block("resnet18", [Case("linear/synthetic", "resnet18"),
                                         Case("linear/cache", "resnet18", loader="torch", cache="memory")],
                            baseline_epochs=3)],
                     Headline("resnet18", epochs=3, train_images=16, val_images=8, preset_first_epoch=False,
                              first_epoch_repeats=1, dali_first_epoch=False))
    raise ValueError(f"unknown suite {name!r}")


# --------------------------------------------------------------------------------------------------------------------
# Measuring


def time_calls(fn: Callable[[], object], *, warmup: int, iters: int, repeats: int, sync: Callable[[], None],
               warmup_s: float = 0.0) -> list[float]:
    """Seconds for each of `repeats` blocks of `iters` calls, after `warmup` untimed calls (and, with `warmup_s`, as
    many more as fill that many seconds); the device is synchronised before and after every timed block, so queued
    work is neither missed nor carried over."""
    t0 = time.perf_counter()
    n = 0
    while n < warmup or time.perf_counter() - t0 < warmup_s:
        fn()
        n += 1
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"min": min(values), "max": max(values), "rel": (max(values) - min(values)) / med if med else 0.0}


def summarise_epochs(timings: dict[str, dict], *, warmup: int, batch_size: int, world: int = 1,
                     comm_s_per_step: float = 0.0) -> dict:
    """Reduce fastft's per-epoch timings ({"epochN": {data, frozen, trainable, optimizer, wall, images}}) to the
    median images/s of the epochs after `warmup`, their spread, and the median ms per step of each segment."""
    keys = sorted(timings, key=lambda k: int(k.removeprefix("epoch")))
    if len(keys) <= warmup:
        raise ValueError(f"{len(keys)} epochs timed, but {warmup} are warm-up: nothing left to measure")
    epochs = [timings[k] for k in keys]
    rates = [e["images"] / e["wall"] for e in epochs]
    timed, timed_rates = epochs[warmup:], rates[warmup:]

    def per_step_ms(e: dict, seconds: float) -> float:
        return 1000.0 * seconds / (e["images"] / (batch_size * world))

    breakdown = {s: statistics.median(per_step_ms(e, e[s]) for e in timed) for s in STEP_SEGMENTS}
    breakdown["communication"] = 1000.0 * comm_s_per_step
    breakdown["other"] = statistics.median(per_step_ms(e, e["wall"] - sum(e[s] for s in STEP_SEGMENTS)) for e in timed)
    return {"images_per_s": statistics.median(timed_rates), "spread": _spread(timed_rates),
            "epochs_images_per_s": rates, "first_epoch_images_per_s": rates[0], "warmup_epochs": warmup,
            "steps_per_epoch": timed[0]["images"] / (batch_size * world),
            "breakdown_ms_per_step": {k: breakdown[k] for k in BREAKDOWN}}


def ratio(measured: dict | None, reference: dict | None, key: str = "images_per_s") -> float | None:
    """measured[key] / reference[key], refusing to mix runs: a ratio of figures from two runs on a shared machine
    would compare the machine's load, not the code."""
    if measured is None or reference is None or measured.get(key) is None or not reference.get(key):
        return None
    if measured.get("run_id") != reference.get("run_id"):
        raise ValueError(f"ratio across runs: {measured.get('run_id')} vs {reference.get('run_id')}")
    return measured[key] / reference[key]


def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def crop_size(model: str, image_size: int) -> int:
    from fastft.data.transforms import spec_from_weights
    from fastft.model import preset_weights

    return spec_from_weights(preset_weights(model, "none"), image_size).crop_size


def precision_name(dtype: str, device: torch.device) -> str:
    from fastft.config import PrecisionConfig
    from fastft.precision import resolve_precision

    return resolve_precision(PrecisionConfig(dtype), device).name


def limit_key(model: str, precision: str, batch_size: int, image_size: int) -> str:
    return f"{model}/{precision}/bs{batch_size}/{image_size}px"


_LIMIT_NETS: dict[tuple[str, str], torch.nn.Module] = {}


def measure_limit(model: str, *, precision: str, s: Settings, device: torch.device, run_id: str,
                  warmup_s: float = 0.0) -> dict:
    """Forward-only images/s of `model` on one in-memory synthetic batch: what the device can do for this backbone."""
    import torchvision

    from fastft.config import PrecisionConfig
    from fastft.data.synthetic import synthetic_batch
    from fastft.precision import resolve_precision

    size = crop_size(model, s.image_size)
    prec = resolve_precision(PrecisionConfig(precision), device)
    if (model, str(device)) not in _LIMIT_NETS:  # built once: random init of a big model costs seconds
        _LIMIT_NETS[(model, str(device))] = torchvision.models.get_model(model, weights=None).eval().to(
            device, memory_format=torch.channels_last)
    net = _LIMIT_NETS[(model, str(device))]
    x, _ = synthetic_batch(s.batch_size, image_size=size)
    x = x.to(device).contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), prec.autocast():
            net(x)

    secs = time_calls(forward, warmup=s.limit_warmup, iters=s.limit_iters, repeats=s.limit_repeats, warmup_s=warmup_s,
                      sync=_sync_for(device))
    rates = [s.batch_size * s.limit_iters / t for t in secs]
    return {"key": limit_key(model, prec.name, s.batch_size, size), "run_id": run_id, "model": model,
            "precision": prec.name, "batch_size": s.batch_size, "image_size": size, "channels_last": True,
            "images_per_s": statistics.median(rates), "spread": _spread(rates), "repeats_images_per_s": rates,
            "warmup_iters": s.limit_warmup, "iters_per_repeat": s.limit_iters}


def combine_limits(measurements: list[dict]) -> dict:
    """One limit from several measurements of the same key in the same run: the median of all their repeats."""
    first = measurements[0]
    if any(m["key"] != first["key"] or m["run_id"] != first["run_id"] for m in measurements):
        raise ValueError("limits combine only measurements of the same model, precision, batch and size in one run")
    rates = [r for m in measurements for r in m["repeats_images_per_s"]]
    return {**{k: v for k, v in first.items() if k not in ("id", "when")}, "images_per_s": statistics.median(rates),
            "spread": _spread(rates), "repeats_images_per_s": rates,
            "measurement_ids": [m.get("id") for m in measurements]}


class LimitLog:
    """Every forward-only measurement of the run, in order. Each mode is compared with the measurements taken just
    before and just after it, so a load change on a shared machine between two modes does not skew either ratio."""

    def __init__(self, items: list[dict], s: Settings, device: torch.device, run_id: str) -> None:
        self.items, self.s, self.device, self.run_id = items, s, device, run_id

    def measure(self, model: str, precision: str, when: str, *, reuse: bool = False, s: Settings | None = None) -> int:
        """Measure (or, with reuse, take the latest measurement when it is the most recent of all and has this key)."""
        s = s or self.s
        key = limit_key(model, precision_name(precision, self.device), s.batch_size, crop_size(model, s.image_size))
        if reuse and self.items and self.items[-1]["key"] == key:
            return self.items[-1]["id"]
        # The first measurement of a key in this process warms up for longer: the first forward passes of a shape
        # (kernel selection, allocator growth) run slower for several calls, and would flatter the first ratio.
        first = all(m["key"] != key for m in self.items)
        m = measure_limit(model, precision=precision, s=s, device=self.device, run_id=self.run_id,
                          warmup_s=s.limit_first_warmup_s if first else 0.0)
        self.items.append({"id": len(self.items), "when": when, "long_warmup": first, **m})
        return self.items[-1]["id"]

    def around(self, ids: list[int]) -> dict:
        return combine_limits([self.items[i] for i in ids])


def bench_folder(train_images: int, val_images: int, num_classes: int = 4) -> Path:
    """root/train and root/val: two of data_bench's photo-like JPEG folders (224-320 px, generated once), linked."""
    train = data_bench.synthetic_folder(train_images, num_classes, seed=0)
    val = data_bench.synthetic_folder(val_images, num_classes, seed=1)
    root = train.parent / f"split-{train.name}--{val.name}"
    root.mkdir(parents=True, exist_ok=True)
    for name, target in (("train", train), ("val", val)):
        link = root / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return root


def case_config(case: Case, s: Settings, root: Path, out_dir: Path, *, epochs: int, device: torch.device):
    from fastft.config import FinetuneConfig

    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights = case.model, "none"  # pretrained-shaped; weights change no timing
    cfg.model.freeze = FREEZE[case.mode] or s.partial_freeze
    cfg.model.channels_last = case.channels_last
    cfg.data.root, cfg.data.image_size = str(root), s.image_size
    cfg.data.batch_size, cfg.data.workers, cfg.data.loader = s.batch_size, s.workers, case.loader
    # The eval transform everywhere: the same per-image work as the seed loop and as the cache (views = 0).
    cfg.data.augment = False
    cfg.precision.dtype = case.precision
    cfg.compile.target = case.compile
    cfg.features.cache = case.cache
    cfg.optim.epochs = epochs
    cfg.checkpoint.every_epochs = 0  # one checkpoint at the end, as any run writes
    cfg.log.step_timing, cfg.log.progress, cfg.log.tensorboard = True, False, False
    cfg.run.out_dir, cfg.run.name, cfg.run.overwrite = str(out_dir), f"bench-{uuid.uuid4().hex[:8]}", True
    cfg.run.device = device.type if device.index is None else f"{device.type}:{device.index}"
    cfg.run.eval_every_epochs = epochs  # evaluate once, at the end (outside the timed epochs)
    return cfg.validate()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def finetune_quiet(cfg) -> tuple[object, list[str], float]:
    """finetune(cfg) in this process: (RunResult, fastft's log lines, wall seconds of the whole call)."""
    from fastft.train import finetune

    logger = logging.getLogger("fastft")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the report table finetune prints
            result = finetune(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return result, handler.lines, time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_distributed(cfg, world: int, tmp: Path) -> dict:
    spec, result = tmp / "case.json", tmp / "result.json"
    spec.write_text(json.dumps({"config": cfg.to_dict(), "result": str(result)}))
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={world}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "benchmarks.throughput",
           "--worker", str(spec)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(result.read_text())


def worker_main(spec_path: str) -> None:
    """One rank of a world-size > 1 mode (under torchrun): fastft adopts this process group and leaves it to us, so
    the trainable parameters' all-reduce can be timed on it afterwards."""
    import torch.distributed as dist

    from fastft.config import config_from_dict
    from fastft.data.folder import index_from_config
    from fastft.model import build_model, count_parameters, freeze

    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cfg.run.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    result, lines, wall = finetune_quiet(cfg)
    model = build_model(cfg.model, index_from_config(cfg.data, seed=cfg.run.seed).num_classes, pretrained_ok=False)
    freeze(model, cfg.model.freeze)
    trainable, _ = count_parameters(model)
    grads = torch.zeros(trainable, device=device)  # fp32 gradients, as DDP reduces them
    secs = time_calls(lambda: dist.all_reduce(grads), warmup=3, iters=10, repeats=3, sync=_sync_for(device))
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps({
            "timings": result.timings, "throughput": result.throughput, "log": lines, "wall_s": wall,
            "feature_cache": result.feature_cache,
            "comm_s_per_step": statistics.median(secs) / 10, "comm_bytes": 4 * trainable}))
    dist.destroy_process_group()


def skip_reason(case: Case, device: torch.device) -> str | None:
    if case.loader == "dali":
        from fastft.data.loaders import dali_available

        if not dali_available():
            return "NVIDIA DALI is not installed"
    if case.world > 1 and device.type == "cuda" and torch.cuda.device_count() < case.world:
        return f"needs {case.world} GPUs"
    return None


def run_case(case: Case, s: Settings, *, device: torch.device, run_id: str, work: Path) -> dict:
    """Time one mode; returns its entry for the results (ratios are attached later, from the same document)."""
    entry = {"name": f"{case.model} {case.name}", "status": "ok", "config": asdict(case)}
    root = bench_folder(s.train_images, s.val_images)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cfg = case_config(case, s, root, Path(tmp), epochs=s.warmup_epochs + s.repeats, device=device)
        comm = 0.0
        if case.world > 1:
            out = _run_distributed(cfg, case.world, Path(tmp))
            timings, lines, wall, comm = out["timings"], out["log"], out["wall_s"], out["comm_s_per_step"]
            cache = out["feature_cache"]
            entry["comm_bytes_per_step"] = out["comm_bytes"]
        else:
            result, lines, wall = finetune_quiet(cfg)
            timings, cache = result.timings, result.feature_cache
    from fastft.compile import resolve_target

    summary = summarise_epochs(timings, warmup=s.warmup_epochs, batch_size=s.batch_size, world=case.world,
                               comm_s_per_step=comm)
    prec = precision_name(case.precision, device)
    return {**entry, "run_id": run_id, "precision": prec, "compile_target": resolve_target(cfg.compile, device),
            **summary, "limit_key": limit_key(case.model, prec, s.batch_size, crop_size(case.model, s.image_size)),
            "limit_ids": [], "limit_images_per_s": None, "ratio_to_limit": None, "ratio_to_baseline": None,
            "wall_s": wall,
            "cache_build_s": cache.get("wall_s"), "fastft_log": [ln for ln in lines if "precision" in ln][:1]}


def summarise_baseline(out: dict, *, warmup: int, run_id: str, source: str) -> dict:
    rates = [e["images_per_s"] for e in out["epochs"]]
    timed = rates[warmup:]
    return {"model": out["model"], "run_id": run_id, "source": source, "images_per_s": statistics.median(timed),
            "spread": _spread(timed), "epochs_images_per_s": rates, "warmup_epochs": warmup, "total_s": out["total_s"],
            "top1": out["top1"], "batch_size": out["batch_size"], "image_size": out["image_size"],
            "workers": out["workers"], "settings": out["settings"]}


def _first_epoch(h: Headline, hs: Settings, root: Path, limits: LimitLog, loader: str, *, device: torch.device,
                 run_id: str, work: Path) -> dict:
    """`h.first_epoch_repeats` fresh 1-epoch linear-probe runs without cache (each a real first epoch: new model, new
    loader and workers), each between two limit measurements at the same size: limit, run, limit, run, limit, ..."""
    size = crop_size(h.model, hs.image_size)
    resolved = _resolved_loader(loader, device)
    name = f"first epoch, {resolved} loader {'(in memory)' if resolved == 'synthetic' else '(JPEG)'}, {size} px"
    before = limits.measure(h.model, "auto", f"before the {name}", reuse=True, s=hs)
    repeats = []
    for i in range(h.first_epoch_repeats):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            cfg = case_config(Case("linear first epoch", h.model, loader=loader), hs, root, Path(tmp), epochs=1,
                              device=device)
            result, _, run_wall = finetune_quiet(cfg)
        after = limits.measure(h.model, "auto", f"after the {name} #{i + 1}", s=hs)
        e0 = result.timings["epoch0"]
        repeats.append({"run_id": run_id, "images": e0["images"], "wall_s": e0["wall"],
                        "images_per_s": e0["images"] / e0["wall"], "breakdown_s": {k: e0[k] for k in STEP_SEGMENTS},
                        "run_wall_s": run_wall, "limit_ids": [before, after], "ratio_to_limit": None})
        before = after
    rates = [r["images_per_s"] for r in repeats]
    decode = decode_ms_per_image(root, h.model, hs.image_size) if resolved != "synthetic" else None
    return {"name": name, "run_id": run_id, "loader": loader, "resolved_loader": resolved, "image_size": size,
            "decode_cpu_ms_per_image": decode, "cores": len(os.sched_getaffinity(0)),
            "images": repeats[0]["images"], "images_per_s": statistics.median(rates), "spread": _spread(rates),
            "wall_s": statistics.median(r["wall_s"] for r in repeats),
            "breakdown_s": {k: statistics.median(r["breakdown_s"][k] for r in repeats) for k in STEP_SEGMENTS},
            "repeats": repeats, "limit_key": limits.items[repeats[0]["limit_ids"][0]]["key"],
            "limit_ids": sorted({i for r in repeats for i in r["limit_ids"]}), "limit_images_per_s": None,
            "ratio_to_limit": None}


def decode_ms_per_image(root: Path, model: str, image_size: int, n: int = 64) -> float:
    """CPU milliseconds to decode and transform one training JPEG (fastft's eval transform, one thread)."""
    from fastft.data.folder import scan_folder
    from fastft.data.torch_loader import ImageDataset
    from fastft.data.transforms import spec_from_weights
    from fastft.model import preset_weights

    files = [f for fs in scan_folder(root / "train").values() for f in fs][:n]
    ds = ImageDataset([(f, 0) for f in files], spec_from_weights(preset_weights(model, "none"), image_size),
                      train=False, augment=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.process_time()
        for i in range(len(files)):
            ds[(i, 0)]
        return 1000 * (time.process_time() - t0) / len(files)
    finally:
        torch.set_num_threads(threads)


def _resolved_loader(loader: str, device: torch.device) -> str:
    if loader != "auto":
        return loader
    from fastft.data.loaders import dali_available

    return "dali" if dali_available() and device.type == "cuda" else "torch"


def _cached_probe(h: Headline, hs: Settings, root: Path, *, device: torch.device, work: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cfg = case_config(Case("linear cache", h.model, loader="auto", cache="memory"), hs, root, Path(tmp),
                          epochs=h.epochs, device=device)
        result, _, wall = finetune_quiet(cfg)
    epoch_walls = [result.timings[k]["wall"] for k in sorted(result.timings, key=lambda k: int(k[5:]))]
    build = result.feature_cache.get("wall_s")
    return {"wall_s": wall, "cache_build_s": build, "epochs_s": sum(epoch_walls),
            "rest_s": wall - sum(epoch_walls) - (build or 0.0), "epoch_wall_s": epoch_walls,
            "top1": result.metrics.get("top1")}


def run_headline(h: Headline, s: Settings, limits: LimitLog, *, device: torch.device, run_id: str,
                 work: Path) -> tuple[dict, dict]:
    """(headline entry, the seed loop's baseline entry); first-epoch ratios are attached by attach_ratios.

    First epochs: JPEG input (the `auto` loader, and DALI when installed and `auto` picks the torchvision loader) and
    in-memory input (the limit's own input: fastft's loop overhead alone) at the suite's size, and JPEG input at the
    weights' preset size when the suite uses another one. Then the
    cached N-epoch probe runs before and after the seed loop (its wall time is the mean of the two), so a change of
    load during the long seed loop is not all on one side."""
    hs = replace(s, train_images=h.train_images, val_images=h.val_images)
    root = bench_folder(h.train_images, h.val_images)
    common = dict(device=device, run_id=run_id, work=work)
    from fastft.data.loaders import dali_available

    loaders = ["auto"]
    if h.dali_first_epoch and dali_available() and _resolved_loader("auto", device) != "dali":
        loaders.append("dali")
    firsts = [_first_epoch(h, hs, root, limits, loader, **common) for loader in [*loaders, "synthetic"]]
    if h.preset_first_epoch and crop_size(h.model, 0) != crop_size(h.model, s.image_size):
        firsts.append(_first_epoch(h, replace(hs, image_size=0), root, limits, "auto", **common))
    runs = [_cached_probe(h, hs, root, device=device, work=work)]
    seed = run_seed(root, model_name=h.model, epochs=h.epochs, batch_size=s.batch_size, workers=s.workers,
                    image_size=s.image_size, device=str(device))
    runs.append(_cached_probe(h, hs, root, device=device, work=work))

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.fmean(values) if values else None

    fastft_entry = {"run_id": run_id, "wall_s": mean("wall_s"), "cache_build_s": mean("cache_build_s"),
                    "epochs_s": mean("epochs_s"), "rest_s": mean("rest_s"), "runs": runs,
                    "precision": precision_name("auto", device), "top1": runs[-1]["top1"], "loader": "auto",
                    "cache": "memory"}
    seed_entry = {"run_id": run_id, "wall_s": seed["total_s"], "epochs_s": sum(e["seconds"] for e in seed["epochs"]),
                  "epoch_wall_s": [e["seconds"] for e in seed["epochs"]], "precision": "fp32", "top1": seed["top1"]}
    entry = {"model": h.model, "epochs": h.epochs, "train_images": h.train_images, "val_images": h.val_images,
             "batch_size": s.batch_size, "image_size": crop_size(h.model, s.image_size), "workers": s.workers,
             "first_epochs": firsts, "fastft_cached": fastft_entry, "baseline": seed_entry,
             "time_ratio_fastft_over_baseline": ratio(fastft_entry, seed_entry, "wall_s")}
    return entry, summarise_baseline(seed, warmup=1, run_id=run_id, source=f"headline ({h.epochs} epochs)")


def attach_ratios(doc: dict) -> None:
    """Each mode as a fraction of its limit (same model, precision, batch, size) and a multiple of its model's
    baseline, from this document only."""
    measurements = doc["limit_measurements"]
    baselines = {b["model"]: b for b in doc["baselines"]}

    def around(entry: dict) -> dict:
        lim = combine_limits([measurements[i] for i in entry["limit_ids"]])
        if lim["key"] != entry.get("limit_key", lim["key"]):
            raise ValueError(f"{entry.get('name', 'headline')}: compared with {lim['key']}, not {entry['limit_key']}")
        entry["limit_images_per_s"] = lim["images_per_s"]
        return lim

    for c in doc["cases"]:
        if c["status"] == "ok":
            lim = around(c)
            c["ratio_to_limit"] = ratio(c, lim)
            c["ratio_to_baseline"] = ratio(c, baselines.get(c["config"]["model"]))
            c["first_epoch_ratio_to_limit"] = ratio({"run_id": c["run_id"], "images_per_s":
                                                     c["first_epoch_images_per_s"]}, lim)
    for first in (doc["headline"] or {}).get("first_epochs", []):
        around(first)  # the limit over all of its measurements, for the table
        for r in first["repeats"]:
            r["ratio_to_limit"] = ratio(r, combine_limits([measurements[i] for i in r["limit_ids"]]))
        first["ratio_to_limit"] = statistics.median(r["ratio_to_limit"] for r in first["repeats"])
        first["ratio_spread"] = _spread([r["ratio_to_limit"] for r in first["repeats"]])
    keys = dict.fromkeys(m["key"] for m in measurements)
    doc["limits"] = [combine_limits([m for m in measurements if m["key"] == k]) for k in keys]


def evaluate_targets(doc: dict) -> list[dict]:
    """The issue's two targets, from the side-by-side run: every first-epoch variant against the limit (>= 0.9), and
    the cached N-epoch probe's wall time against the seed loop's (<= 1/8). `met` is None when not measured."""
    h = doc["headline"]
    targets = []
    for first in (h["first_epochs"] if h else [{"name": "first epoch", "ratio_to_limit": None}]):
        value = first["ratio_to_limit"]
        targets.append({"name": f"first_epoch_vs_limit: {first['name']}", "threshold": ">= 0.9", "value": value,
                        "met": None if value is None else value >= 0.9, "entry": first,
                        "description": f"linear probe (no cache), {first['name']}: images/s / forward-only limit"})
    value = h["time_ratio_fastft_over_baseline"] if h else None
    targets.append({"name": "cached_probe_time_vs_baseline", "threshold": "<= 0.125", "value": value,
                    "met": None if value is None else value <= 0.125, "entry": None,
                    "description": (f"wall time of a {h['epochs'] if h else 'N'}-epoch linear probe, fastft with the "
                                    "memory feature cache / the seed loop, same JPEGs and batch")})
    for t in targets:
        t["why"] = _why(t, h) if t["met"] is False else ""
        t.pop("entry")
    return targets


def _why(target: dict, h: dict) -> str:
    """A missed target's explanation, from the measured breakdown."""
    if target["entry"] is not None:
        e = target["entry"]
        b, wall = e["breakdown_s"], e["wall_s"]
        parts = ", ".join(f"{k} {100 * v / wall:.0f}%" for k, v in b.items())
        why = f"epoch 0 split: {parts}, other {max(0.0, 100 * (wall - sum(b.values())) / wall):.0f}%"
        if e.get("decode_cpu_ms_per_image") and e.get("limit_images_per_s"):
            fwd = 1000 * e["cores"] / e["limit_images_per_s"]  # CPU ms per image of the forward at the limit
            share = e["decode_cpu_ms_per_image"] / fwd
            why += (f"; decode + transform cost {e['decode_cpu_ms_per_image']:.1f} CPU-ms per image against the "
                    f"forward's {fwd:.1f} CPU-ms at the limit: work the limit leaves out and that the same "
                    f"{e['cores']} cores must do, so even perfect overlap stops at {1 / (1 + share):.2f} x limit "
                    "(on a GPU host the decode runs on other cores or on the GPU's decoder)")
        else:
            why += "; the first run's start-up (loader, first batches) counts in the epoch"
        rs = e.get("ratio_spread") or {}
        if rs.get("max") is not None and rs["max"] >= 0.9 > rs["min"]:
            why += (f"; its {len(e['repeats'])} runs range {rs['min']:.2f} - {rs['max']:.2f}, across the target: "
                    "the miss is within run-to-run variation on this machine")
        return why
    f = h["fastft_cached"]
    return (f"fastft {f['wall_s']:.1f}s = cache build {f['cache_build_s'] or 0:.1f}s + {h['epochs']} epochs "
            f"{f['epochs_s']:.1f}s + model build, evaluation and checkpoint/export writes {f['rest_s']:.1f}s")


# --------------------------------------------------------------------------------------------------------------------
# The run


def hardware(device: torch.device) -> dict:
    from fastft.precision import cpu_has_native_bf16

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"hostname": socket.gethostname(), "cpu_model": data_bench.cpu_model(), "cpu_count": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)), "cpu_native_bf16": cpu_has_native_bf16(),
            "gpu_model": torch.cuda.get_device_name(0) if gpus else None, "gpu_count": gpus, "device": str(device),
            "load_avg_start": os.getloadavg()}


def versions() -> dict:
    import numpy

    import fastft

    return {**data_bench.versions(), "fastft": fastft.__version__, "fastft_commit": source_commit(),
            "numpy": numpy.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}


def source_commit() -> str | None:
    """The checkout's commit ("+dirty" with uncommitted changes to tracked files); None outside a git checkout."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def hardware_slug(hw: dict) -> str:
    gpu, cpu = f"{hw['gpu_model']}-{hw['gpu_count']}gpu", f"{hw['cpu_model']}-{hw['cores_available']}c"
    base = gpu if hw["gpu_count"] else cpu
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def run(args: argparse.Namespace) -> dict:
    """Run a suite and write its results; returns the results document."""
    suite = make_suite(args.suite)
    s = suite.settings
    if args.workers:
        s.workers = args.workers
    device = resolve_device(args.device if args.device != "auto" else s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    s.device = str(device)
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    run_id = uuid.uuid4().hex[:12]
    t_start = time.perf_counter()
    doc = {"schema_version": SCHEMA_VERSION, "benchmark": "fastft-throughput", "run_id": run_id, "suite": suite.name,
           "date": dt.datetime.now().isoformat(timespec="seconds"), "command": _command(args),
           "hardware": hardware(device), "versions": versions(),
           "settings": {**asdict(s), "headline": asdict(suite.headline) if suite.headline else None,
                        "notes": suite.notes, "time_budget_s": args.time_budget},
           "limit_measurements": [], "limits": [], "baselines": [], "cases": [], "headline": None, "targets": [],
           "wall_s": None}
    limits = LimitLog(doc["limit_measurements"], s, device, run_id)

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    def over_budget() -> bool:
        return bool(args.time_budget) and time.perf_counter() - t_start > args.time_budget

    work = Path(tempfile.mkdtemp(prefix="fastft-bench-"))
    try:
        say(f"suite {suite.name} on {device} ({doc['hardware']['cpu_model']}, {doc['hardware']['cores_available']} "
            f"cores{', ' + str(doc['hardware']['gpu_model']) if doc['hardware']['gpu_count'] else ''}); run {run_id}")
        # The side-by-side run first: it carries the targets, and a time budget must not cut it.
        if suite.headline and not only:
            say(f"headline: {suite.headline.model}, {suite.headline.epochs} epochs, cached fastft vs seed loop")
            entry, base = run_headline(suite.headline, s, limits, device=device, run_id=run_id, work=work)
            doc["headline"] = entry
            doc["baselines"].append(base)
            say("headline: first epochs " + ", ".join(f"{f['name']} {f['images_per_s']:.1f} img/s"
                                                      for f in entry["first_epochs"])
                + f"; cached {entry['fastft_cached']['wall_s']:.1f}s vs seed {entry['baseline']['wall_s']:.1f}s")
        for block in suite.blocks:
            cases = [c for c in block.cases if not only or any(o in f"{c.model} {c.name}" for o in only)]
            if not cases:
                continue
            if block.baseline_epochs and block.model not in {b["model"] for b in doc["baselines"]}:
                out = run_seed(bench_folder(s.train_images, s.val_images), model_name=block.model,
                               epochs=block.baseline_epochs, batch_size=s.batch_size, workers=s.workers,
                               image_size=s.image_size, device=str(device))
                doc["baselines"].append(summarise_baseline(out, warmup=1, run_id=run_id, source="modes' data"))
                say(f"{block.model} seed baseline: {doc['baselines'][-1]['images_per_s']:.1f} img/s")
            for case in cases:
                name = f"{case.model} {case.name}"
                reason = f"time budget of {args.time_budget:.0f}s spent" if over_budget() else skip_reason(case, device)
                if reason:
                    doc["cases"].append({"name": name, "status": "skipped", "config": asdict(case), "reason": reason})
                    say(f"{name}: skipped ({reason})")
                    continue
                try:
                    before = limits.measure(case.model, case.precision, f"before {name}", reuse=True)
                    entry = run_case(case, s, device=device, run_id=run_id, work=work)
                    entry["limit_ids"] = [before, limits.measure(case.model, case.precision, f"after {name}")]
                except Exception as e:  # one failing mode must not lose the others' figures
                    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    entry = {"name": name, "status": "error", "config": asdict(case),
                             "reason": f"{type(e).__name__}: {first_line}"}
                doc["cases"].append(entry)
                say(f"{name}: " + (f"{entry['images_per_s']:.1f} img/s" if entry["status"] == "ok"
                                   else f"{entry['status']} ({entry['reason']})"))
    except KeyboardInterrupt:  # a hard stop (gpu_check.sh's timeout sends SIGINT): keep what was measured
        doc["interrupted"] = True
        say("interrupted: writing the modes measured so far")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    attach_ratios(doc)
    for lim in doc["limits"]:
        say(f"limit {lim['key']}: {lim['images_per_s']:.1f} img/s ({len(lim['repeats_images_per_s'])} repeats)")
    doc["targets"] = evaluate_targets(doc)
    doc["hardware"]["load_avg_end"] = os.getloadavg()
    doc["wall_s"] = time.perf_counter() - t_start
    validate(doc)
    json_path, md_path = write_results(doc, Path(args.out), latest=not args.no_latest)
    say(f"wrote {json_path} and {md_path}")
    return doc


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line (the same whether the run came from `fastft bench` or `python -m ...`)."""
    parts = [f"--suite {args.suite}", f"--out {args.out}"]
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    if args.workers:
        parts.append(f"--workers {args.workers}")
    if args.time_budget:
        parts.append(f"--time-budget {args.time_budget:g}")
    if args.only:
        parts.append(f"--only '{args.only}'")
    return "python -m benchmarks.throughput " + " ".join(parts)


def validate(doc: dict) -> None:
    """Raise ValueError when the document does not follow the schema (version and required keys)."""
    def need(obj: dict, kind: str, where: str) -> None:
        missing = [k for k in REQUIRED_KEYS[kind] if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")

    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    need(doc, "document", "document")
    need(doc["hardware"], "hardware", "hardware")
    for i, m in enumerate(doc["limit_measurements"]):
        need(m, "limit_measurement", f"limit_measurements[{i}]")
    for i, lim in enumerate(doc["limits"]):
        need(lim, "limit", f"limits[{i}]")
    for i, b in enumerate(doc["baselines"]):
        need(b, "baseline", f"baselines[{i}]")
    for i, c in enumerate(doc["cases"]):
        need(c, "case", f"cases[{i}]")
        if c["status"] == "ok":
            need(c, "case_ok", f"cases[{i}] ({c['name']})")
    for i, t in enumerate(doc["targets"]):
        need(t, "target", f"targets[{i}]")
    if doc["headline"] is not None:
        need(doc["headline"], "headline", "headline")
        for i, f in enumerate(doc["headline"]["first_epochs"]):
            need(f, "first_epoch", f"headline.first_epochs[{i}]")


# --------------------------------------------------------------------------------------------------------------------
# Output


def _f(v: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{suffix}"


def _mode_cells(c: dict) -> str:
    cfg = c["config"]
    compile_ = c.get("compile_target", cfg["compile"])
    return (f"| {cfg['model']} | {cfg['mode']} | {cfg['loader']} | {c.get('precision', cfg['precision'])} | "
            f"{compile_} | {'on' if cfg['channels_last'] else 'off'} | {cfg['cache']} | {cfg['world']} |")


def render_cases(doc: dict) -> list[str]:
    head = [("| model | mode | input | precision | compile | channels_last | cache | world | img/s | spread | "
            "data | frozen | trainable | optimizer | comm | other | x limit | x baseline |"),
            "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for c in doc["cases"]:
        if c["status"] != "ok":
            rows.append(f"{_mode_cells(c)} {c['status']}: {c.get('reason', '')} |" + " |" * 9)
            continue
        b = c["breakdown_ms_per_step"]
        rows.append(f"{_mode_cells(c)} {c['images_per_s']:.1f} | {c['spread']['min']:.1f} - {c['spread']['max']:.1f} | "
                    + " | ".join(f"{b[k]:.0f}" for k in BREAKDOWN)
                    + f" | {_f(c['ratio_to_limit'], '.2f')} | {_f(c['ratio_to_baseline'], '.2f')} |")
    return head + rows


def render_markdown(doc: dict) -> str:
    hw, v, s = doc["hardware"], doc["versions"], doc["settings"]
    gpu = f"{hw['gpu_count']} x {hw['gpu_model']}" if hw["gpu_count"] else "no GPU"
    lines = [f"# fastft throughput: suite `{doc['suite']}`, {doc['date']}", "",
             f"`{doc['command']}` (run `{doc['run_id']}`, {doc['wall_s']:.0f} s)", "",
             *(["**Interrupted before the end: only the modes listed were measured.**", ""] if doc.get("interrupted")
               else []),
             (f"Hardware: {hw['cpu_model']}, {hw['cores_available']} of {hw['cpu_count']} cores "
             f"(native bf16: {hw['cpu_native_bf16']}), {gpu}; device `{hw['device']}`; load average "
             f"{hw['load_avg_start'][0]:.1f} at start, {hw.get('load_avg_end', [0])[0]:.1f} at end."),
             "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             (f"Settings: batch {s['batch_size']}, crop {s['image_size'] or 'preset'} px, {s['workers']} data workers; "
             f"modes on {s['train_images']} train / {s['val_images']} val JPEGs, {s['warmup_epochs']} warm-up epoch + "
             f"{s['repeats']} timed epochs each (median, spread = min - max of the timed epochs); ms per step by "
             "segment (median); `comm` = standalone all-reduce of the trainable gradients (overlapped inside "
             "`trainable` in the real step); x limit = / forward-only images/s at the same model, precision and batch; "
             "x baseline = / the seed loop's images/s (same JPEGs, batch; fp32, train-mode backbone)."), ""]
    lines += [f"Note: {n}" for n in s.get("notes", [])] + [""] if s.get("notes") else []
    lines += ["## Modes", "", *render_cases(doc), "", ("## Limits (forward only, in-memory synthetic batch, "
              "channels_last, inference_mode)"), "", "| key | img/s | spread | repeats |", "|---|---:|---:|---:|"]
    lines += [f"| {lim['key']} | {lim['images_per_s']:.1f} | {lim['spread']['min']:.1f} - {lim['spread']['max']:.1f} | "
              f"{len(lim['repeats_images_per_s'])} x {lim['iters_per_repeat']} batches |" for lim in doc["limits"]]
    lines += ["", "## Seed baseline (benchmarks/baseline_seed.py)", "", "| model | img/s | spread | epochs | source |",
              "|---|---:|---:|---:|---|"]
    lines += [f"| {b['model']} | {b['images_per_s']:.1f} | {b['spread']['min']:.1f} - {b['spread']['max']:.1f} | "
              f"{len(b['epochs_images_per_s'])} ({b['warmup_epochs']} warm-up) | {b['source']} |"
              for b in doc["baselines"]]
    lines += ["", *render_headline(doc), "", *render_targets(doc), ""]
    return "\n".join(lines)


def render_headline(doc: dict) -> list[str]:
    h = doc["headline"]
    if not h:
        return ["## Side by side", "", "not run in this suite"]
    f, b = h["fastft_cached"], h["baseline"]
    walls = " and ".join(f"{r['wall_s']:.1f} s" for r in f["runs"])
    lines = [(f"## Side by side: {h['epochs']}-epoch linear probe of {h['model']} on {h['train_images']} train + "
              f"{h['val_images']} val JPEGs, batch {h['batch_size']}, {h['image_size']} px, {h['workers']} workers"),
             "",
             "| run | wall time | cache build | epochs | rest (model build, eval, writes) | val top-1 |",
             "|---|---:|---:|---:|---:|---:|",
             (f"| seed loop (fp32, no cache) | {b['wall_s']:.1f} s | - | {b['epochs_s']:.1f} s | "
              f"{b['wall_s'] - b['epochs_s']:.1f} s | {_f(b['top1'], '.3f')} |"),
             (f"| fastft, memory cache ({f['precision']}), mean of the runs before and after the seed loop "
              f"({walls}) | {f['wall_s']:.1f} s | {_f(f['cache_build_s'], '.1f', ' s')} | {f['epochs_s']:.2f} s | "
              f"{f['rest_s']:.1f} s | {_f(f['top1'], '.3f')} |"), "",
             (f"**fastft / seed loop wall time = {h['time_ratio_fastft_over_baseline']:.3f} "
              f"(1/{1 / h['time_ratio_fastft_over_baseline']:.1f})**"), "",
             ("Linear probe, first epoch without cache (fresh run: new model, loader and workers), against the "
              "forward-only limit measured just before and after each run; median of the repeats, x limit = median "
              "of the per-run ratios (min - max):"), "",
             "| input | crop | runs | img/s | limit img/s | x limit | data | frozen | trainable + optimizer | other "
             "| run wall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in h["first_epochs"]:
        bd, wall = e["breakdown_s"], e["wall_s"]
        pct = {k: 100 * v / wall for k, v in bd.items()}
        rs = e.get("ratio_spread") or {}
        lines.append(f"| {e['resolved_loader']} | {e['image_size']} px | {len(e['repeats'])} | "
                     f"{e['images_per_s']:.1f} | {_f(e['limit_images_per_s'])} | **{_f(e['ratio_to_limit'], '.2f')}** "
                     f"({_f(rs.get('min'), '.2f')} - {_f(rs.get('max'), '.2f')}) | {pct['data']:.0f}% | "
                     f"{pct['frozen']:.0f}% | {pct['trainable'] + pct['optimizer']:.0f}% | "
                     f"{max(0.0, 100 - sum(pct.values())):.0f}% | "
                     f"{statistics.median(r['run_wall_s'] for r in e['repeats']):.1f} s |")
    steps = h["train_images"] // h["batch_size"]
    ahead = min(steps, 4 * h["workers"]) if h["workers"] else 0
    lines += ["", (f"fastft starts the first epoch's loading before it builds the model, so up to {ahead} of the "
                   f"epoch's {steps} batches ({h['workers']} workers x 4 prefetched; DALI: its prefetch queue) are "
                   "decoded during set-up, outside the epoch timer but inside the run's wall time. An epoch much "
                   "longer than that tends to the steady-state ratio of the same input in the modes table."),
              "", "Random pixel content makes top-1 meaningless here: the task is timing."]
    return lines


def render_targets(doc: dict) -> list[str]:
    out = ["## Targets", ""]
    for t in doc["targets"]:
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        out.append(f"- **{state}**: {t['description']}: {_f(t['value'], '.3f')} (target {t['threshold']})"
                   + (f". Why: {t['why']}" if t.get("why") else ""))
    return out


def render_latest(doc: dict, md_name: str) -> str:
    """The README's benchmark section: the latest table with ratios to the baseline and to the limit."""
    hw = doc["hardware"]
    where = (f"{hw['gpu_count']} x {hw['gpu_model']}" if hw["gpu_count"]
             else f"{hw['cpu_model']}, {hw['cores_available']} cores")
    lines = [f"### Throughput ({where}, {doc['date'][:10]}, suite `{doc['suite']}`)", "",
             (f"Measured by `make bench`; full results, per-step breakdown and versions: "
             f"[benchmarks/results/{md_name}](benchmarks/results/{md_name}). x limit: fraction of the forward-only "
             "images/s of the same backbone at the same batch and precision; x baseline: multiple of the naive seed "
             "loop (fp32, frozen by requires_grad only) on the same JPEGs."), "",
             "| model | mode | input | precision | cache | img/s | x limit | x baseline |",
             "|---|---|---|---|---|---:|---:|---:|"]
    for c in doc["cases"]:
        if c["status"] == "ok" and c["config"]["world"] == 1 and c["config"]["channels_last"] and \
                c["config"]["compile"] == "none" and c["config"]["precision"] == "auto":
            cfg = c["config"]
            lines.append(f"| {cfg['model']} | {cfg['mode']} | {cfg['loader']} | {c['precision']} | {cfg['cache']} | "
                         f"{c['images_per_s']:.1f} | {_f(c['ratio_to_limit'], '.2f')} | "
                         f"{_f(c['ratio_to_baseline'], '.2f')} |")
    head = render_headline(doc)
    lines += ["", "#### " + head[0].removeprefix("## "), *head[1:], "", *render_targets(doc)[2:], ""]
    return "\n".join(lines)


def write_results(doc: dict, out_dir: Path, *, latest: bool = True) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{hardware_slug(doc['hardware'])}-{doc['date'][:10].replace('-', '')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(render_markdown(doc))
    if latest:
        (out_dir / "LATEST.md").write_text(render_latest(doc, md_path.name))
    return json_path, md_path


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return None
    from fastft.bench import add_arguments

    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
