"""One benchmark mode: its data, its fastft config, one timed run (in process, or under torchrun for world > 1),
and the seed loop's figure for a block of modes."""

from __future__ import annotations

import statistics
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from fastft.benchmark import baseline, data, measure
from fastft.benchmark.measure import crop_size, limit_key
from fastft.benchmark.suites import FREEZE, Block, Case, Settings
from fastft.benchmark.worker import run_distributed


def bench_folder(train_images: int, val_images: int, num_classes: int = 4) -> Path:
    """root/train and root/val: two of data_bench's photo-like JPEG folders (224-320 px, generated once), linked."""
    train = data.synthetic_folder(train_images, num_classes, seed=0)
    val = data.synthetic_folder(val_images, num_classes, seed=1)
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
            out = run_distributed(cfg, case.world, Path(tmp))
            timings, lines, wall, comm = out["timings"], out["log"], out["wall_s"], out["comm_s_per_step"]
            cache = out["feature_cache"]
            entry["comm_bytes_per_step"] = out["comm_bytes"]
        else:
            result, lines, wall = measure.finetune_quiet(cfg)
            timings, cache = result.timings, result.feature_cache
    from fastft.compile import resolve_target

    summary = measure.summarise_epochs(
        timings, warmup=s.warmup_epochs, batch_size=s.batch_size, world=case.world, comm_s_per_step=comm
    )
    if case.cache != "off":  # what a cached step reads: one stored feature row per image
        entry["cache_row_bytes"] = cache_row_bytes(cfg)
    prec = measure.precision_name(case.precision, device)
    return {
        **entry,
        "run_id": run_id,
        "precision": prec,
        "compile_target": resolve_target(cfg.compile, device),
        **summary,
        "limit_key": limit_key(case.model, prec, s.batch_size, crop_size(case.model, s.image_size)),
        "limit_ids": [],
        "limit_images_per_s": None,
        "ratio_to_limit": None,
        "ratio_to_baseline": None,
        "wall_s": wall,
        "cache_build_s": cache.get("wall_s"),
        "fastft_log": [ln for ln in lines if "precision" in ln][:1],
    }


def summarise_baseline(out: dict, *, warmup: int, run_id: str, source: str) -> dict:
    rates = [e["images_per_s"] for e in out["epochs"]]
    timed = rates[warmup:]
    return {
        "model": out["model"],
        "run_id": run_id,
        "source": source,
        "images_per_s": statistics.median(timed),
        "spread": measure.spread_of(timed),
        "epochs_images_per_s": rates,
        "warmup_epochs": warmup,
        "total_s": out["total_s"],
        "top1": out["top1"],
        "batch_size": out["batch_size"],
        "image_size": out["image_size"],
        "workers": out["workers"],
        "settings": out["settings"],
    }


def cache_row_bytes(cfg) -> int:
    """Bytes of one image's row in the feature cache: the frozen prefix's output size at the stored dtype."""
    from fastft.model import build_model, freeze, split_model

    size = crop_size(cfg.model.name, cfg.data.image_size)
    model = build_model(cfg.model, 2, image_size=size, pretrained_ok=False)
    freeze(model, cfg.model.freeze)
    prefix = split_model(model).prefix
    with torch.inference_mode():
        numel = prefix.eval()(torch.zeros(1, 3, size, size)).numel()
    itemsize = {"fp16": 2, "fp32": 4}[cfg.features.dtype]
    return numel * itemsize


def block_baseline(block: Block, s: Settings, *, device: torch.device, run_id: str) -> dict:
    """The seed loop on the block's modes' JPEGs, `block.baseline_epochs` epochs (the first is warm-up)."""
    out = baseline.run_seed(
        bench_folder(s.train_images, s.val_images),
        model_name=block.model,
        epochs=block.baseline_epochs,
        batch_size=s.batch_size,
        workers=s.workers,
        image_size=s.image_size,
        device=str(device),
    )
    return summarise_baseline(out, warmup=1, run_id=run_id, source="modes' data")
