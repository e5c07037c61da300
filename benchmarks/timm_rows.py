"""Throughput rows for a timm model beside its torchvision twin: the same architecture (resnet50), data, batch,
precision and loop, each source built by fastft (`model.source = timm | torchvision`, random weights: nothing is
downloaded), linear probe and full fine-tune, runs alternated.

    python -m benchmarks.timm_rows --out benchmarks/results/timm-rows-<yyyymmdd>.md

Each run is `fastft.train.finetune` in this process on a folder of JPEGs (fastft.data.synthetic.make_image_folder),
torch loader, 2 epochs: the second epoch's img/s is the steady state reported (the first includes warm-up).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import timm
import torch
import torchvision

from fastft.config import FinetuneConfig
from fastft.data.synthetic import make_image_folder
from fastft.train import finetune

MODES = {"linear probe": "backbone", "full fine-tune": "none"}


def one_run(root: Path, out: Path, *, source: str, freeze: str, args) -> float:
    cfg = FinetuneConfig()
    cfg.model.source, cfg.model.name, cfg.model.weights, cfg.model.freeze = source, "resnet50", "none", freeze
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size = str(root), args.image_size, args.batch_size
    cfg.data.workers, cfg.data.loader = args.workers, "torch"
    cfg.precision.dtype, cfg.compile.target = args.precision, "none"
    cfg.optim.epochs = 2
    cfg.checkpoint.every_epochs = 0
    cfg.run.out_dir, cfg.run.name, cfg.run.overwrite, cfg.run.device = str(out), f"{source}-{freeze}", True, "cpu"
    cfg.log.progress, cfg.log.tensorboard = False, False
    result = finetune(cfg.validate())
    return result.throughput["epoch1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=256, help="training JPEGs (+ a quarter as many for validation)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--pairs", type=int, default=2)
    args = p.parse_args()
    img_s: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_image_folder(
            tmp / "data",
            num_classes=4,
            train_per_class=args.images // 4,
            val_per_class=args.images // 16,
            image_size=160,
        )
        for _ in range(args.pairs):
            for mode, freeze in MODES.items():
                for source in ("torchvision", "timm"):
                    v = one_run(root, tmp / "runs", source=source, freeze=freeze, args=args)
                    img_s.setdefault((mode, source), []).append(v)
    write_record(Path(args.out), args, img_s)


def write_record(out: Path, args, img_s: dict) -> None:
    from benchmarks.machine import cpu_name

    lines = [
        "# timm beside torchvision: resnet50 through fastft",
        "",
        f"Command: `python -m benchmarks.timm_rows --out {args.out} --images {args.images} --image-size"
        f" {args.image_size} --batch-size {args.batch_size} --workers {args.workers} --precision {args.precision}"
        f" --pairs {args.pairs}`",
        "",
        f"Hardware: {cpu_name()}, {torch.get_num_threads()} threads. Python {platform.python_version()}, torch"
        f" {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}.",
        "",
        f"{args.images} train JPEGs, {args.image_size} px, batch {args.batch_size}, {args.workers} workers, torch"
        f" loader, {args.precision}, channels_last, no compile, random weights; img/s of the second epoch of each run,"
        " runs alternated (torchvision, timm) per mode.",
        "",
        "| mode | source | img/s (each run) | median | timm / torchvision |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        tv = statistics.median(img_s[(mode, "torchvision")])
        for source in ("torchvision", "timm"):
            v = img_s[(mode, source)]
            ratio = f"{statistics.median(v) / tv:.2f}" if source == "timm" else ""
            each = ", ".join(f"{x:.1f}" for x in v)
            lines.append(f"| {mode} | {source} | {each} | {statistics.median(v):.1f} | {ratio} |")
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
