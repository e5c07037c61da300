"""Measuring: timed calls with the device synchronised, a quiet timed fastft run, epoch summaries, the forward-only
limit of a backbone, the host's memory-copy bandwidth, and ratios that refuse to mix runs."""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from collections.abc import Callable

import torch

from fastft.benchmark.suites import Settings

STEP_SEGMENTS = ("data", "frozen", "trainable", "optimizer")  # fastft.timing.SEGMENTS
BREAKDOWN = (*STEP_SEGMENTS, "communication", "other")


def time_calls(
    fn: Callable[[], object], *, warmup: int, iters: int, repeats: int, sync: Callable[[], None], warmup_s: float = 0.0
) -> list[float]:
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


def spread_of(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"min": min(values), "max": max(values), "rel": (max(values) - min(values)) / med if med else 0.0}


def summarise_epochs(
    timings: dict[str, dict], *, warmup: int, batch_size: int, world: int = 1, comm_s_per_step: float = 0.0
) -> dict:
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
    return {
        "images_per_s": statistics.median(timed_rates),
        "spread": spread_of(timed_rates),
        "epochs_images_per_s": rates,
        "first_epoch_images_per_s": rates[0],
        "warmup_epochs": warmup,
        "steps_per_epoch": timed[0]["images"] / (batch_size * world),
        "breakdown_ms_per_step": {k: breakdown[k] for k in BREAKDOWN},
    }


def ratio(measured: dict | None, reference: dict | None, key: str = "images_per_s") -> float | None:
    """measured[key] / reference[key], refusing to mix runs: a ratio of figures from two runs on a shared machine
    would compare the machine's load, not the code."""
    if measured is None or reference is None or measured.get(key) is None or not reference.get(key):
        return None
    if measured.get("run_id") != reference.get("run_id"):
        raise ValueError(f"ratio across runs: {measured.get('run_id')} vs {reference.get('run_id')}")
    return measured[key] / reference[key]


def sync_for(device: torch.device) -> Callable[[], None]:
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


def row_fields(spec, *, run_id: str, batch: int, workers: int, image_size: int, device: torch.device) -> dict:
    """The fields every side-by-side row (a suites dataclass `spec`: probe wall, save gap) records about its run."""
    from dataclasses import asdict

    return {
        "status": "ok",
        "run_id": run_id,
        **asdict(spec),
        "batch_size": batch,
        "workers": workers,
        "image_size": crop_size(spec.model, image_size),
        "precision": precision_name(spec.precision, device),
        "device": str(device),
    }


def limit_key(model: str, precision: str, batch_size: int, image_size: int) -> str:
    return f"{model}/{precision}/bs{batch_size}/{image_size}px"


_LIMIT_NETS: dict[tuple[str, str], torch.nn.Module] = {}


def measure_limit(
    model: str, *, precision: str, s: Settings, device: torch.device, run_id: str, warmup_s: float = 0.0
) -> dict:
    """Forward-only images/s of `model` on one in-memory synthetic batch: what the device can do for this backbone."""
    import torchvision

    from fastft.config import PrecisionConfig
    from fastft.data.synthetic import synthetic_batch
    from fastft.precision import resolve_precision

    size = crop_size(model, s.image_size)
    prec = resolve_precision(PrecisionConfig(precision), device)
    if (model, str(device)) not in _LIMIT_NETS:  # built once: random init of a big model costs seconds
        _LIMIT_NETS[(model, str(device))] = (
            torchvision.models.get_model(model, weights=None).eval().to(device, memory_format=torch.channels_last)
        )
    net = _LIMIT_NETS[(model, str(device))]
    x, _ = synthetic_batch(s.batch_size, image_size=size)
    x = x.to(device).contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), prec.autocast():
            net(x)

    secs = time_calls(
        forward,
        warmup=s.limit_warmup,
        iters=s.limit_iters,
        repeats=s.limit_repeats,
        warmup_s=warmup_s,
        sync=sync_for(device),
    )
    rates = [s.batch_size * s.limit_iters / t for t in secs]
    return {
        "key": limit_key(model, prec.name, s.batch_size, size),
        "run_id": run_id,
        "model": model,
        "precision": prec.name,
        "batch_size": s.batch_size,
        "image_size": size,
        "channels_last": True,
        "images_per_s": statistics.median(rates),
        "spread": spread_of(rates),
        "repeats_images_per_s": rates,
        "warmup_iters": s.limit_warmup,
        "iters_per_repeat": s.limit_iters,
    }


def combine_limits(measurements: list[dict]) -> dict:
    """One limit from several measurements of the same key in the same run: the median of all their repeats."""
    first = measurements[0]
    if any(m["key"] != first["key"] or m["run_id"] != first["run_id"] for m in measurements):
        raise ValueError("limits combine only measurements of the same model, precision, batch and size in one run")
    rates = [r for m in measurements for r in m["repeats_images_per_s"]]
    return {
        **{k: v for k, v in first.items() if k not in ("id", "when")},
        "images_per_s": statistics.median(rates),
        "spread": spread_of(rates),
        "repeats_images_per_s": rates,
        "measurement_ids": [m.get("id") for m in measurements],
    }


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
        m = measure_limit(
            model,
            precision=precision,
            s=s,
            device=self.device,
            run_id=self.run_id,
            warmup_s=s.limit_first_warmup_s if first else 0.0,
        )
        self.items.append({"id": len(self.items), "when": when, "long_warmup": first, **m})
        return self.items[-1]["id"]

    def around(self, ids: list[int]) -> dict:
        return combine_limits([self.items[i] for i in ids])


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


def measure_memcpy(*, run_id: str, mib: int = 256, repeats: int = 5) -> dict:
    """Host memory bandwidth: bytes per second that one `Tensor.copy_` moves between two `mib` MiB host buffers (each
    byte read once and written once; torch's own threads). What bounds training from the memory feature cache: every
    step gathers rows of a host table, far less work per byte than any backbone forward."""
    n = mib << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    secs = time_calls(lambda: dst.copy_(src), warmup=1, iters=1, repeats=repeats, sync=lambda: None)
    rates = [n / t for t in secs]
    return {
        "run_id": run_id,
        "method": "torch.Tensor.copy_, host to host, uint8",
        "buffer_bytes": n,
        "threads": torch.get_num_threads(),
        "bytes_per_s": statistics.median(rates),
        "spread": spread_of(rates),
        "repeats_bytes_per_s": rates,
    }
