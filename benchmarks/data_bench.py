"""Data-only throughput: DaliLoader (CPU pipeline) vs torchvision ImageFolder + DataLoader, same folder, same threads.

    python -m benchmarks.data_bench --data DIR --batch-size 32 --workers 2 --image-size 224 --epochs 3 \
        --out benchmarks/results/

Both loaders run the training transform (random resized crop, flip, normalise to float CHW) over
the same files with the same parallelism: DALI with `threads=workers`, torchvision with
`num_workers=workers` (persistent workers, so neither pays a start-up cost after epoch 1). The
first epoch is warm-up (file cache, worker start, pipeline build) and is not counted; the figure
is the median images/s of the remaining epochs, with their min and max as the spread. Without
`--data` a deterministic folder of synthetic JPEGs is generated once into a cache folder.

Writes `data-<hostname>-<YYYYMMDD>.json` and `.md` into `--out`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

from fastft.benchmark.data import cpu_model, synthetic_folder, versions

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def time_epochs(loader, epochs: int) -> list[dict]:
    """Iterates `loader` `epochs` times; returns per-epoch {seconds, images, images_per_s}."""
    out = []
    for _ in range(epochs):
        images = 0
        start = time.perf_counter()
        for x, _ in loader:
            images += x.shape[0]
        seconds = time.perf_counter() - start
        out.append({"seconds": seconds, "images": images, "images_per_s": images / seconds})
    return out


def summarise(per_epoch: list[dict]) -> dict:
    timed = [e["images_per_s"] for e in per_epoch[1:]]  # epoch 1 is warm-up
    return {
        "images_per_s": statistics.median(timed),
        "min": min(timed),
        "max": max(timed),
        "epochs": per_epoch,
    }


def bench_dali(samples, args) -> dict:
    from fastft.data.dali_feed import DaliLoader

    loader = DaliLoader(
        samples,
        train=True,
        batch_size=args.batch_size,
        crop_size=args.image_size,
        resize_size=args.image_size,
        mean=MEAN,
        std=STD,
        threads=args.workers,
        prefetch=args.dali_prefetch,
        device="cpu",
    )
    return summarise(time_epochs(loader, args.epochs))


def bench_torchvision(dataset, args) -> dict:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # like DaliLoader in training: full batches only
        num_workers=args.workers,
        pin_memory=False,
        persistent_workers=args.workers > 0,
    )
    return summarise(time_epochs(loader, args.epochs))


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"data-{socket.gethostname()}-{dt.date.today():%Y%m%d}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    cfg, hw, v = result["config"], result["hardware"], result["versions"]
    rows = [
        f"| {name} | {r['images_per_s']:.1f} | {r['min']:.1f} - {r['max']:.1f} |"
        for name, r in (("DALI (CPU pipeline)", result["dali"]), ("torchvision DataLoader", result["torchvision"]))
    ]
    md = "\n".join(
        [
            f"# Data loader throughput, {result['date']}",
            "",
            f"`{result['command']}`",
            "",
            (
                f"Data: {cfg['data']} ({cfg['num_images']} images); batch {cfg['batch_size']}, "
                f"{cfg['workers']} workers/threads, {cfg['image_size']} px random resized crop + flip + normalise, "
                f"{cfg['epochs']} epochs (first is warm-up; median of the rest, spread = min - max)."
            ),
            "",
            "| loader | images/s | spread |",
            "|---|---:|---:|",
            *rows,
            "",
            f"**DALI / torchvision = {result['ratio_dali_over_torchvision']:.2f}x**",
            "",
            f"Hardware: {hw['cpu_model']}, {hw['cpu_count']} cores "
            f"({hw['cores_available']} available to this process).",
            (
                f"Versions: Python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
                f"DALI {v['dali']}, Pillow {v['pillow']}."
            ),
            "",
        ]
    )
    md_path.write_text(md)
    return json_path, md_path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="ImageFolder root (class sub-folders); synthetic JPEGs if omitted")
    parser.add_argument("--num-images", type=int, default=512, help="size of the synthetic folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="including the first, warm-up epoch (>= 2)")
    parser.add_argument("--dali-prefetch", type=int, default=2, help="DALI pipeline prefetch queue depth")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is warm-up)")

    from torchvision import datasets, transforms

    root = args.data if args.data is not None else synthetic_folder(args.num_images)
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(args.image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    samples = [(path, label) for path, label in dataset.samples]

    print(f"{len(samples)} images in {root}; batch {args.batch_size}, {args.workers} workers/threads", flush=True)
    # Alternate the order between runs would be fairer for page-cache effects, but both run a warm-up epoch first.
    tv = bench_torchvision(dataset, args)
    print(f"torchvision: {tv['images_per_s']:.1f} images/s ({tv['min']:.1f} - {tv['max']:.1f})", flush=True)
    dali = bench_dali(samples, args)
    print(f"DALI:        {dali['images_per_s']:.1f} images/s ({dali['min']:.1f} - {dali['max']:.1f})", flush=True)

    result = {
        "benchmark": "data_bench",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.data_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            "data": str(root) if args.data is not None else f"synthetic ({root})",
            "num_images": len(samples),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "warmup_epochs": 1,
            "dali_prefetch": args.dali_prefetch,
            "transform": "RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + HorizontalFlip + Normalize, "
            "float32 CHW",
        },
        "dali": dali,
        "torchvision": tv,
        "ratio_dali_over_torchvision": dali["images_per_s"] / tv["images_per_s"],
        "versions": versions(),
        "hardware": {
            "hostname": socket.gethostname(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
    }
    json_path, md_path = write_results(result, args.out)
    print(f"DALI / torchvision = {result['ratio_dali_over_torchvision']:.2f}x; wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
