"""Macro-F1 on a deliberately imbalanced procedural set, with and without class weighting, same budget.

    python benchmarks/imbalance.py --data /tmp/imbalance-data --out benchmarks/results/imbalance-<date>.md

The set: 4 shape classes; two keep 100 training images, two keep 10 (10:1); validation is balanced (40 per class), so
macro-F1 and the rare classes' recall show what the imbalance costs. Each arm trains resnet18 from random weights
(nothing is downloaded) with the same epochs, batch, learning rate and seeds; only optim.class_weights / optim.loss
/ data.sampler differ. `--arms` runs some of the arms only."""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastft.config import FinetuneConfig
from fastft.data.synthetic import make_image_folder
from fastft.train import finetune

ARMS = {
    "unweighted": {},
    "class_weights=balanced": {"class_weights": "balanced"},
    "focal + balanced": {"class_weights": "balanced", "loss": "focal"},
    "data.sampler=balanced": {"data.sampler": "balanced"},
}
RARE_KEEP = 10


def make_imbalanced(root: Path) -> Path:
    data = make_image_folder(root / "full", num_classes=4, train_per_class=100, val_per_class=40, image_size=48, seed=0)
    out = root / "imbalanced"
    if not out.exists():
        shutil.copytree(data, out)
        for cls in sorted((out / "train").iterdir())[2:]:  # the last two classes keep RARE_KEEP images
            for f in sorted(cls.iterdir())[RARE_KEEP:]:
                f.unlink()
    return out


def run_arm(data: Path, out: Path, arm: dict, seed: int, epochs: int) -> dict:
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights, cfg.model.freeze = "resnet18", "none", "none"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(data), 48, 32, 2
    cfg.precision.dtype, cfg.compile.target = "fp32", "none"
    cfg.optim.epochs, cfg.optim.lr, cfg.optim.warmup_steps = epochs, 0.05, 5
    for key, value in arm.items():  # "section.key", or an optim key
        section, name = key.split(".") if "." in key else ("optim", key)
        setattr(getattr(cfg, section), name, value)
    cfg.run.out_dir, cfg.run.name, cfg.run.device, cfg.run.seed = str(out), f"s{seed}", "cpu", seed
    cfg.log.progress, cfg.log.tensorboard = False, False
    result = finetune(cfg.validate())
    m = result.metrics
    rare = [c for c in m["per_class"] if c["class"] in m["classes"][2:]]  # the classes cut to RARE_KEEP
    return {"f1_macro": m["f1_macro"], "top1": m["top1"], "rare_recall": statistics.mean(c["recall"] for c in rare)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "fastft-imbalance"))
    ap.add_argument("--out", required=True, help="markdown record to write")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = ap.parse_args()
    data = make_imbalanced(Path(args.data))
    runs = Path(tempfile.mkdtemp(prefix="fastft-imbalance-runs-"))
    rows, t0 = {}, time.time()
    try:
        for name in args.arms:
            arm = ARMS[name]
            rows[name] = [run_arm(data, runs / name.replace(" ", "_"), arm, s, args.epochs) for s in args.seeds]
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = [
        "# Class imbalance: macro-F1 with and without class weighting or the balanced sampler",
        "",
        f"Command: `python benchmarks/imbalance.py --out {args.out} --epochs {args.epochs} --seeds "
        f"{' '.join(map(str, args.seeds))}"
        + (f" --arms {' '.join(repr(a) for a in args.arms)}`" if args.arms != list(ARMS) else "`"),
        "",
        f"Hardware: {cpu}, {torch.get_num_threads()} threads. Python {platform.python_version()}, torch "
        f"{torch.__version__}. Wall time {time.time() - t0:.0f} s.",
        "",
        f"Data: 4 procedural shape classes at 48 px; train 100 / 100 / {RARE_KEEP} / {RARE_KEEP} images (10:1), "
        "validation 40 per class (balanced). resnet18 from random weights, freeze=none, SGD lr 0.05, 5 warm-up steps, "
        f"cosine, batch 32, {args.epochs} epochs, fp32; the same seeds for every arm.",
        "",
        "| arm | macro-F1 (per seed) | mean macro-F1 | mean top-1 | mean recall of the two rare classes |",
        "|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        per = ", ".join(f"{r['f1_macro']:.3f}" for r in rs)
        lines.append(
            f"| {name} | {per} | {statistics.mean(r['f1_macro'] for r in rs):.3f} | "
            f"{statistics.mean(r['top1'] for r in rs):.3f} | {statistics.mean(r['rare_recall'] for r in rs):.3f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
