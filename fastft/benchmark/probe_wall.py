"""A cached linear probe's wall time against its physical limit: one forward pass of the frozen backbone over the data.

The probe: `model.freeze=backbone`, `features.cache=memory`, N epochs, every other setting at its default (precision
auto, checkpoints every epoch, TensorBoard, report.html, exports), random initial weights from a local file (a weights
source, as pretrained ones are: its checkpoints are saved as a pretrained run's are; nothing is downloaded). Each run is
`fastft.train.finetune` in this process, so Python start-up and imports are left out.

The limit: a plain loop, independent of fastft, that decodes every train and val JPEG once (torchvision ImageFolder,
the resize + centre crop + normalise of the weights' preset, a DataLoader with the same batch and workers) and runs the
backbone without its classifier on them in inference mode, channels_last, in the precision the probe resolves. Limit
and probe alternate; the ratio is taken per pair, then the median. The median pair's probe is broken down into its
set-up phases, the cache build (the run's own forward pass), the epochs and the teardown phases.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fastft.benchmark.measure import sync_for

TARGET = 1.2  # probe wall <= 1.2 x one forward pass


def weights_file(folder: Path, model: str) -> Path:
    """`model`'s random initial weights in a safetensors file (seeded)."""
    from safetensors.torch import save_file
    from torchvision import models

    torch.manual_seed(0)
    path = folder / f"{model}-random.safetensors"
    state = models.get_model(model, weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def probe_config(
    root: Path,
    out: Path,
    *,
    model: str,
    weights: Path,
    epochs: int,
    batch: int,
    workers: int,
    image_size: int,
    device: torch.device,
):
    from fastft.config import FinetuneConfig

    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights, cfg.model.freeze = model, str(weights), "backbone"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(root), image_size, batch, workers
    cfg.features.cache = "memory"
    cfg.optim.epochs = epochs
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), "probe", str(device)
    cfg.log.progress = False
    return cfg.validate()


def forward_pass_s(
    root: Path, *, model: str, batch: int, workers: int, image_size: int, precision: str, device: torch.device
) -> tuple[float, int]:
    """Seconds to decode every train and val JPEG once and run the frozen backbone on it; the image count."""
    from torch.utils.data import ConcatDataset, DataLoader
    from torchvision import datasets, models
    from torchvision.transforms import v2

    from fastft.config import PrecisionConfig
    from fastft.data.transforms import spec_from_weights
    from fastft.model import preset_weights
    from fastft.precision import resolve_precision

    spec = spec_from_weights(preset_weights(model, "none"), image_size)
    tf = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(spec.resize_size, antialias=True),
            v2.CenterCrop(spec.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )
    data = ConcatDataset([datasets.ImageFolder(root / split, transform=tf) for split in ("train", "val")])
    net = models.get_model(model, weights=None)
    net.fc = torch.nn.Identity()
    net.eval().to(device=device, memory_format=torch.channels_last)
    amp = resolve_precision(PrecisionConfig(precision), device)
    sync = sync_for(device)
    sync()
    t = time.perf_counter()
    loader = DataLoader(data, batch_size=batch, num_workers=workers, shuffle=False, pin_memory=device.type == "cuda")
    with torch.inference_mode(), amp.autocast():
        for images, _ in loader:
            net(images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))
    sync()
    return time.perf_counter() - t, len(data)


def probe_run(root: Path, out: Path, *, device: torch.device, **kw) -> tuple[float, object]:
    """One probe through `finetune` in this process: (wall seconds of the call, RunResult)."""
    from fastft.benchmark.measure import finetune_quiet

    cfg = probe_config(root, out, device=device, **kw)
    sync = sync_for(device)
    sync()
    t = time.perf_counter()
    result, _, _ = finetune_quiet(cfg)
    sync()
    return time.perf_counter() - t, result


def breakdown(wall: float, result) -> list[list]:
    """Where a probe's wall time went: [[part, seconds], ...] in run order, the rest last (sums to `wall`)."""
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
    return [[k, float(v)] for k, v in rows.items()]


def measure_pairs(
    root: Path,
    work: Path,
    *,
    model: str,
    epochs: int,
    pairs: int,
    batch: int,
    workers: int,
    image_size: int,
    precision: str,
    device: torch.device,
    say: Callable[[str], None] = print,
    warm_root: Path | None = None,
) -> dict:
    """A warm-up of each side, then `pairs` alternated (forward pass, probe) pairs: the figures and the median pair's
    breakdown. The warm-ups: a forward pass over `root` (page cache, libraries, thread pools), and a 1-epoch probe
    on the few images of `warm_root` when given (the imports and first uses a run pays once per process, at
    start-up, which the target leaves out; without it the first pair's probe pays them alone)."""
    kw = {"model": model, "batch": batch, "workers": workers, "image_size": image_size}
    weights = weights_file(work, model)
    forward_pass_s(root, precision=precision, device=device, **kw)  # warm: page cache, libraries, thread pools
    if warm_root is not None:
        warm = {**kw, "batch": 4}  # a few images: any batch larger than them is refused
        probe_run(warm_root, work / "warm", weights=weights, epochs=1, device=device, **warm)
    fwd, walls, results = [], [], []
    for i in range(pairs):
        secs, images = forward_pass_s(root, precision=precision, device=device, **kw)
        fwd.append(secs)
        wall, result = probe_run(root, work / f"probe{i}", weights=weights, epochs=epochs, device=device, **kw)
        walls.append(wall)
        results.append(result)
        say(f"probe wall pair {i}: forward pass {secs:.2f} s, probe {wall:.2f} s")
    ratios = [w / f for f, w in zip(fwd, walls, strict=True)]
    mid = sorted(range(pairs), key=lambda i: ratios[i])[pairs // 2]  # the median pair's run
    med = statistics.median(ratios)
    return {
        "images": images,
        "forward_pass_s": fwd,
        "probe_wall_s": walls,
        "ratios": ratios,
        "ratio_median": med,
        "target": TARGET,
        "met": med <= TARGET,
        "median_pair": mid,
        "breakdown_s": breakdown(walls[mid], results[mid]),
    }


def render(entry: dict) -> list[str]:
    """The pairs table, the median and the median pair's breakdown (markdown lines)."""
    lines = [
        "| pair | one forward pass (s) | probe wall (s) | probe / forward pass |",
        "|---:|---:|---:|---:|",
    ]
    for i, (f, w, r) in enumerate(zip(entry["forward_pass_s"], entry["probe_wall_s"], entry["ratios"], strict=True)):
        lines.append(f"| {i} | {f:.2f} | {w:.2f} | {r:.2f} |")
    med, wall = entry["ratio_median"], entry["probe_wall_s"][entry["median_pair"]]
    lines += [
        "",
        f"**Median probe / forward pass: {med:.2f}** (target <= {entry['target']}: "
        f"{'met' if entry['met'] else 'missed'}).",
        "",
        f"Where the median pair's probe ({wall:.2f} s) went:",
        "",
        "| part | seconds | share |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {secs:.2f} | {secs / wall:.0%} |" for name, secs in entry["breakdown_s"]]
    return lines


def run_row(p, s, *, device: torch.device, run_id: str, work: Path, say: Callable[[str], None] = print) -> dict:
    """The suite's row (a `suites.ProbeWall`, on the suite's `Settings` and device) on data_bench's photo-like JPEGs."""
    import tempfile

    from fastft.benchmark import cases, measure

    batch = p.batch_size or s.batch_size
    workers = s.workers if p.workers is None else p.workers
    root = cases.bench_folder(p.train_images, p.val_images)
    warm_root = cases.bench_folder(8, 4)
    say(f"probe wall: {p.model}, {p.epochs}-epoch cached probe vs one forward pass, {p.pairs} pairs")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        m = measure_pairs(
            root,
            Path(tmp),
            model=p.model,
            epochs=p.epochs,
            pairs=p.pairs,
            batch=batch,
            workers=workers,
            image_size=p.image_size,
            precision=p.precision,
            device=device,
            say=say,
            warm_root=warm_root,
        )
    return {
        **measure.row_fields(p, run_id=run_id, batch=batch, workers=workers, image_size=p.image_size, device=device),
        **m,
    }
