"""The side-by-side run: the linear probe's first epoch against the forward-only limit, and a cached N-epoch linear
probe against the seed loop, wall time of each whole call, on the same JPEGs."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from fastft.benchmark import baseline, cases, measure
from fastft.benchmark.measure import STEP_SEGMENTS, LimitLog, crop_size, ratio
from fastft.benchmark.suites import Case, Headline, Settings


def _first_epoch(
    h: Headline,
    hs: Settings,
    root: Path,
    limits: LimitLog,
    loader: str,
    *,
    device: torch.device,
    run_id: str,
    work: Path,
) -> dict:
    """`h.first_epoch_repeats` fresh 1-epoch linear-probe runs without cache (each a real first epoch: new model, new
    loader and workers), each between two limit measurements at the same size: limit, run, limit, run, limit, ..."""
    size = crop_size(h.model, hs.image_size)
    resolved = _resolved_loader(loader, device)
    name = f"first epoch, {resolved} loader {'(in memory)' if resolved == 'synthetic' else '(JPEG)'}, {size} px"
    before = limits.measure(h.model, "auto", f"before the {name}", reuse=True, s=hs)
    repeats = []
    for i in range(h.first_epoch_repeats):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            cfg = cases.case_config(
                Case("linear first epoch", h.model, loader=loader), hs, root, Path(tmp), epochs=1, device=device
            )
            result, _, run_wall = measure.finetune_quiet(cfg)
        after = limits.measure(h.model, "auto", f"after the {name} #{i + 1}", s=hs)
        e0 = result.timings["epoch0"]
        repeats.append(
            {
                "run_id": run_id,
                "images": e0["images"],
                "wall_s": e0["wall"],
                "images_per_s": e0["images"] / e0["wall"],
                "breakdown_s": {k: e0[k] for k in STEP_SEGMENTS},
                "run_wall_s": run_wall,
                "limit_ids": [before, after],
                "ratio_to_limit": None,
            }
        )
        before = after
    rates = [r["images_per_s"] for r in repeats]
    decode = decode_ms_per_image(root, h.model, hs.image_size) if resolved != "synthetic" else None
    return {
        "name": name,
        "run_id": run_id,
        "loader": loader,
        "resolved_loader": resolved,
        "image_size": size,
        "decode_cpu_ms_per_image": decode,
        "cores": len(os.sched_getaffinity(0)),
        "images": repeats[0]["images"],
        "images_per_s": statistics.median(rates),
        "spread": measure.spread_of(rates),
        "wall_s": statistics.median(r["wall_s"] for r in repeats),
        "breakdown_s": {k: statistics.median(r["breakdown_s"][k] for r in repeats) for k in STEP_SEGMENTS},
        "repeats": repeats,
        "limit_key": limits.items[repeats[0]["limit_ids"][0]]["key"],
        "limit_ids": sorted({i for r in repeats for i in r["limit_ids"]}),
        "limit_images_per_s": None,
        "ratio_to_limit": None,
    }


def decode_ms_per_image(root: Path, model: str, image_size: int, n: int = 64) -> float:
    """CPU milliseconds to decode and transform one training JPEG (fastft's eval transform, one thread)."""
    from fastft.data.index import scan_folder
    from fastft.data.torch_loader import ImageDataset
    from fastft.data.transforms import spec_from_weights
    from fastft.model import preset_weights

    files = [f for fs in scan_folder(root / "train").values() for f in fs][:n]
    ds = ImageDataset(
        [(f, 0) for f in files],
        spec_from_weights(preset_weights(model, "none"), image_size),
        train=False,
        augment=False,
    )
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
        cfg = cases.case_config(
            Case("linear cache", h.model, loader="auto", cache="memory"),
            hs,
            root,
            Path(tmp),
            epochs=h.epochs,
            device=device,
        )
        result, _, wall = measure.finetune_quiet(cfg)
    epoch_walls = [result.timings[k]["wall"] for k in sorted(result.timings, key=lambda k: int(k[5:]))]
    build = result.feature_cache.get("wall_s")
    return {
        "wall_s": wall,
        "cache_build_s": build,
        "epochs_s": sum(epoch_walls),
        "rest_s": wall - sum(epoch_walls) - (build or 0.0),
        "epoch_wall_s": epoch_walls,
        "top1": result.metrics.get("top1"),
    }


def run_headline(
    h: Headline, s: Settings, limits: LimitLog, *, device: torch.device, run_id: str, work: Path
) -> tuple[dict, dict]:
    """(headline entry, the seed loop's baseline entry); first-epoch ratios are attached by attach_ratios.

    First epochs: JPEG input (the `auto` loader, and DALI when installed and `auto` picks the torchvision loader) and
    in-memory input (the limit's own input: fastft's loop overhead alone) at the suite's size, and JPEG input at the
    weights' preset size when the suite uses another one. Then the
    cached N-epoch probe runs before and after the seed loop (its wall time is the mean of the two), so a change of
    load during the long seed loop is not all on one side."""
    hs = replace(s, train_images=h.train_images, val_images=h.val_images)
    root = cases.bench_folder(h.train_images, h.val_images)
    common = dict(device=device, run_id=run_id, work=work)
    from fastft.data.loaders import dali_available

    loaders = ["auto"]
    if h.dali_first_epoch and dali_available() and _resolved_loader("auto", device) != "dali":
        loaders.append("dali")
    firsts = [_first_epoch(h, hs, root, limits, loader, **common) for loader in [*loaders, "synthetic"]]
    if h.preset_first_epoch and crop_size(h.model, 0) != crop_size(h.model, s.image_size):
        firsts.append(_first_epoch(h, replace(hs, image_size=0), root, limits, "auto", **common))
    runs = [_cached_probe(h, hs, root, device=device, work=work)]
    seed = baseline.run_seed(
        root,
        model_name=h.model,
        epochs=h.epochs,
        batch_size=s.batch_size,
        workers=s.workers,
        image_size=s.image_size,
        device=str(device),
    )
    runs.append(_cached_probe(h, hs, root, device=device, work=work))

    def mean(key: str) -> float | None:
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.fmean(values) if values else None

    fastft_entry = {
        "run_id": run_id,
        "wall_s": mean("wall_s"),
        "cache_build_s": mean("cache_build_s"),
        "epochs_s": mean("epochs_s"),
        "rest_s": mean("rest_s"),
        "runs": runs,
        "precision": measure.precision_name("auto", device),
        "top1": runs[-1]["top1"],
        "loader": "auto",
        "cache": "memory",
    }
    seed_entry = {
        "run_id": run_id,
        "wall_s": seed["total_s"],
        "epochs_s": sum(e["seconds"] for e in seed["epochs"]),
        "epoch_wall_s": [e["seconds"] for e in seed["epochs"]],
        "precision": "fp32",
        "top1": seed["top1"],
    }
    entry = {
        "model": h.model,
        "epochs": h.epochs,
        "train_images": h.train_images,
        "val_images": h.val_images,
        "batch_size": s.batch_size,
        "image_size": crop_size(h.model, s.image_size),
        "workers": s.workers,
        "first_epochs": firsts,
        "fastft_cached": fastft_entry,
        "baseline": seed_entry,
        "time_ratio_fastft_over_baseline": ratio(fastft_entry, seed_entry, "wall_s"),
    }
    return entry, cases.summarise_baseline(seed, warmup=1, run_id=run_id, source=f"headline ({h.epochs} epochs)")
