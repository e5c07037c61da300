"""A 10-epoch cached linear probe against its physical limit: one forward pass of the frozen backbone over the data.

    python -m benchmarks.probe_wall --out benchmarks/results/probe-wall-<yyyymmdd>.md

The probe: resnet50 (random weights from a local file: a weights source, as pretrained ones are, and nothing is
downloaded), `model.freeze=backbone`, `features.cache=memory`, 10 epochs, 320 train + 80 val JPEGs at 224 px, batch
32, 2 loader workers, every other setting at its default (precision auto, checkpoints every epoch, TensorBoard,
report.html, exports). Each run is `fastft.train.finetune` in this process, so Python start-up and imports are left
out, as the target asks.

The limit: a plain loop, independent of fastft, that decodes every train and val JPEG once (torchvision ImageFolder,
the resize + centre crop + normalise of the weights' preset, a DataLoader with the same batch and workers) and runs
resnet50 without its classifier on them in inference mode, channels_last, in the precision `auto` picks here. Limit
and probe alternate; the ratio is taken per pair, then the median. The record also breaks each probe run down into
its set-up phases, the cache build (the run's own forward pass), the epochs and the teardown phases.

The measurement is fastft.benchmark.probe_wall's (the `probe_wall` row of `fastft bench`); this script runs it on its
own data (fastft's synthetic 256 px JPEGs, 4 classes) and writes the record.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.machine import hardware_line
from fastft.benchmark.probe_wall import measure_pairs, render
from fastft.config import PrecisionConfig
from fastft.data.synthetic import make_image_folder
from fastft.precision import resolve_precision


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown record to write")
    p.add_argument("--pairs", type=int, default=3, help="alternating (forward pass, probe) pairs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_image_folder(
            tmp / "data", num_classes=4, train_per_class=80, val_per_class=20, image_size=256, seed=0
        )
        entry = measure_pairs(
            root, tmp, model="resnet50", epochs=args.epochs, pairs=args.pairs, batch=args.batch,
            workers=args.workers, image_size=224, precision="auto", device=torch.device("cpu"),
            warm_root=make_image_folder(
                tmp / "warm", num_classes=4, train_per_class=2, val_per_class=1, image_size=256, seed=1
            ),
        )  # fmt: skip
    write_record(Path(args.out), args, entry)


def write_record(out: Path, args, entry: dict) -> None:
    precision = resolve_precision(PrecisionConfig(), torch.device("cpu")).name
    lines = [
        f"# A {args.epochs}-epoch cached linear probe against one forward pass over the data",
        "",
        f"Command: `python -m benchmarks.probe_wall --out {args.out} --pairs {args.pairs} --epochs {args.epochs}"
        f" --batch {args.batch} --workers {args.workers}`",
        "",
        hardware_line("torchvision"),
        "",
        f"Data: {entry['images']} JPEGs (320 train + 80 val, 4 classes, 256 px files, 224 px crops), batch"
        f" {args.batch}, {args.workers} loader workers, CPU. Probe: resnet50 (random weights from a file),"
        f" `model.freeze=backbone`, `features.cache=memory`, {args.epochs} epochs, defaults otherwise (checkpoint"
        f" every epoch, TensorBoard, report.html, exports); both sides in {precision} (precision auto here);"
        " `finetune` in-process (no Python start-up or imports).",
        "",
        *render(entry),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
