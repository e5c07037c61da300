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
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import hardware_line
from fastft.config import FinetuneConfig
from fastft.data.synthetic import make_image_folder
from fastft.precision import resolve_precision
from fastft.train import finetune


def weights_file(folder: Path) -> Path:
    """resnet50's random initial weights in a file: a weights source as pretrained ones are (nothing downloaded), so
    the probe saves its checkpoints as a pretrained run does (the trainable part + a fingerprint of the frozen one)."""
    from safetensors.torch import save_file
    from torchvision import models

    torch.manual_seed(0)
    path = folder / "resnet50-random.safetensors"
    save_file({k: v.contiguous() for k, v in models.resnet50(weights=None).state_dict().items()}, path)
    return path


def probe_config(root: Path, out: Path, *, weights: Path, epochs: int, batch: int, workers: int) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights, cfg.model.freeze = "resnet50", str(weights), "backbone"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(root), 224, batch, workers
    cfg.features.cache = "memory"
    cfg.optim.epochs = epochs
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), "probe", "cpu"
    cfg.log.progress = False
    return cfg.validate()


def forward_pass_s(root: Path, *, batch: int, workers: int) -> tuple[float, int]:
    """Seconds to decode every train and val JPEG once and run the frozen backbone on it; the image count."""
    from torch.utils.data import ConcatDataset, DataLoader
    from torchvision import datasets, models
    from torchvision.transforms import v2

    from fastft.config import PrecisionConfig

    precision = resolve_precision(PrecisionConfig(), torch.device("cpu"))
    tf = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(232, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    data = ConcatDataset([datasets.ImageFolder(root / split, transform=tf) for split in ("train", "val")])
    model = models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    model.eval().to(memory_format=torch.channels_last)
    t = time.perf_counter()
    loader = DataLoader(data, batch_size=batch, num_workers=workers, shuffle=False)
    with torch.inference_mode(), precision.autocast():
        for images, _ in loader:
            model(images.contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - t, len(data)


def probe_run(root: Path, out: Path, **kw) -> tuple[float, object]:
    cfg = probe_config(root, out, **kw)
    t = time.perf_counter()
    result = finetune(cfg)
    return time.perf_counter() - t, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown record to write")
    p.add_argument("--pairs", type=int, default=3, help="alternating (forward pass, probe) pairs")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    kw = {"batch": args.batch, "workers": args.workers}
    fwd, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_image_folder(
            tmp / "data", num_classes=4, train_per_class=80, val_per_class=20, image_size=256, seed=0
        )
        weights = weights_file(tmp)
        forward_pass_s(root, **kw)  # warm: page cache, libraries, thread pools
        for i in range(args.pairs):
            fwd.append(forward_pass_s(root, **kw))
            runs.append(probe_run(root, tmp / f"run{i}", weights=weights, epochs=args.epochs, **kw))
            print(f"pair {i}: forward pass {fwd[-1][0]:.2f} s, probe {runs[-1][0]:.2f} s", flush=True)
    write_record(Path(args.out), args, fwd, runs)


def _breakdown(wall: float, result) -> dict[str, float]:
    setup, teardown = dict(result.phases["setup"]), dict(result.phases["teardown"])
    setup.pop("total"), teardown.pop("total")
    cache = setup.pop("feature_cache", 0.0)
    epochs = sum(t["wall"] for t in result.timings.values())
    rows = {f"set-up: {k}": v for k, v in setup.items()}
    n = len(result.timings)
    rows["feature cache build (the run's forward pass)"] = cache
    rows[f"{n} epochs' training loops"] = epochs
    rows |= {f"teardown (the last epoch's end, then the run's): {k}": v for k, v in teardown.items()}
    rows[f"the rest: evaluation and saves at the ends of epochs 1-{n - 1}"] = wall - sum(rows.values())
    return rows


def write_record(out: Path, args, fwd: list[tuple[float, int]], runs: list[tuple[float, object]]) -> None:
    ratios = [r[0] / f[0] for f, r in zip(fwd, runs)]
    images = fwd[0][1]
    from fastft.config import PrecisionConfig

    precision = resolve_precision(PrecisionConfig(), torch.device("cpu")).name
    mid = sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]  # the median pair's run
    lines = [
        "# A 10-epoch cached linear probe against one forward pass over the data",
        "",
        f"Command: `python -m benchmarks.probe_wall --out {args.out} --pairs {args.pairs} --epochs {args.epochs}"
        f" --batch {args.batch} --workers {args.workers}`",
        "",
        hardware_line("torchvision"),
        "",
        f"Data: {images} JPEGs (320 train + 80 val, 4 classes, 256 px files, 224 px crops), batch {args.batch},"
        f" {args.workers} loader workers, CPU. Probe: resnet50 (random weights from a file), `model.freeze=backbone`,"
        f" `features.cache=memory`, {args.epochs} epochs, defaults otherwise (checkpoint every epoch, TensorBoard,"
        f" report.html, exports); both sides in {precision} (precision auto here); `finetune` in-process (no Python"
        " start-up or imports).",
        "",
        "| pair | one forward pass (s) | probe wall (s) | probe / forward pass |",
        "|---:|---:|---:|---:|",
    ]
    for i, (f, r) in enumerate(zip(fwd, runs)):
        lines.append(f"| {i} | {f[0]:.2f} | {r[0]:.2f} | {ratios[i]:.2f} |")
    med = statistics.median(ratios)
    lines += [
        "",
        f"**Median probe / forward pass: {med:.2f}** (target <= 1.2: {'met' if med <= 1.2 else 'missed'}).",
        "",
        f"Where the median pair's probe ({runs[mid][0]:.2f} s) went:",
        "",
        "| part | seconds | share |",
        "|---|---:|---:|",
    ]
    for name, secs in _breakdown(runs[mid][0], runs[mid][1]).items():
        lines.append(f"| {name} | {secs:.2f} | {secs / runs[mid][0]:.0%} |")
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
