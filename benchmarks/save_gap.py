"""The step-time gap around a checkpoint save (synchronous write vs background write), and the optimizer step kernel
(fused vs torch's default), on a resnet50 full fine-tune on the CPU.

    python -m benchmarks.save_gap --out /tmp/save-gap --steps 30 --every 5

Nothing is downloaded: random weights, synthetic JPEGs. Every optimizer step's time is the interval between two
calls of the loop's after_step (which holds the save): the interval that starts at a save step holds that save. In
"sync" the file is written on the training thread (Checkpointer(background=False), the write before this change);
in "background" by the writer thread. The optimizer comparison runs without saves, fused vs unfused, alternating."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import shutil
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torchvision

import fastft
import fastft.optim
import fastft.trainer
from fastft.checkpoint import Checkpointer
from fastft.config import FinetuneConfig
from fastft.data.synthetic import make_image_folder


def _config(data: Path, out: Path, name: str, *, steps: int, every: int, size: int, batch: int, optim: str):
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights, cfg.model.freeze = "resnet50", "none", "none"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(data), size, batch, 0
    cfg.precision.dtype, cfg.compile.target = "fp32", "none"
    cfg.optim.name, cfg.optim.max_steps, cfg.optim.epochs = optim, steps, 100
    cfg.checkpoint.every_steps = every
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), name, "cpu"
    cfg.log.progress, cfg.log.tensorboard = False, False
    return cfg.validate()


def _timed_run(cfg: FinetuneConfig, *, background: bool, fused: bool) -> list[float]:
    """Run `cfg`; returns the optimizer steps' entry times into after_step."""
    marks: list[float] = []
    real_after = fastft.trainer.after_step

    def after_step(*args, **kwargs):
        marks.append(time.perf_counter())
        return real_after(*args, **kwargs)

    patches = [mock.patch.object(fastft.trainer, "after_step", after_step)]
    if not background:
        sync = functools.partial(Checkpointer, background=False)  # the write on the training thread
        patches.append(mock.patch.object(fastft.trainer, "Checkpointer", sync))
    if not fused:
        patches.append(mock.patch.object(fastft.optim, "step_kernel", lambda device: {}))
    for p in patches:
        p.start()
    try:
        fastft.trainer.finetune(cfg)
    finally:
        for p in patches:
            p.stop()
    return marks


def _gaps(marks: list[float], every: int) -> dict:
    """Step intervals: [i] runs from after_step of step i+1 to that of step i+2 (1-based steps)."""
    iv = [b - a for a, b in itertools.pairwise(marks)]
    step_of = [i + 1 for i in range(len(iv))]  # the step whose after_step (and save) opens the interval
    at_save = [t for s, t in zip(step_of, iv) if every and s % every == 0]
    after_save = [t for s, t in zip(step_of, iv) if every and s % every == 1 and s > 1]
    normal = [t for s, t in zip(step_of, iv) if not every or s % every not in (0, 1)]
    normal = normal[2:] if len(normal) > 4 else normal  # the first steps warm up
    if not normal:
        raise SystemExit("no step away from a save: use more --steps or a larger --every")
    med = statistics.median(normal)
    out = {"normal_median_s": med, "normal_n": len(normal)}
    if at_save:
        out.update(
            at_save_s=at_save,
            at_save_median_s=statistics.median(at_save),
            ratio_at_save=statistics.median(at_save) / med,
            next_step_s=after_save,
            ratio_next_step=statistics.median(after_save) / med if after_save else None,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--opt-steps", type=int, default=16, help="steps of each optimizer-kernel run")
    ap.add_argument("--pairs", type=int, default=2, help="alternating fused/unfused pairs")
    ap.add_argument("--parts", default="saves,optimizer", help="saves, optimizer or both (comma-separated)")
    args = ap.parse_args()
    data = make_image_folder(args.out / "data", num_classes=4, train_per_class=64, val_per_class=2, image_size=64)
    kw = {"size": args.size, "batch": args.batch, "optim": args.optim}
    result: dict = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastft": fastft.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    for mode in ("sync", "background") if "saves" in args.parts else ():
        cfg = _config(data, args.out / "runs", mode, steps=args.steps, every=args.every, **kw)
        marks = _timed_run(cfg, background=mode == "background", fused=True)
        result[mode] = _gaps(marks, args.every)
        result[mode]["last_pt_bytes"] = (args.out / "runs" / mode / "last.pt").stat().st_size
        shutil.rmtree(args.out / "runs" / mode)
        print(mode, json.dumps(result[mode]), flush=True)
    for pair in range(args.pairs if "optimizer" in args.parts else 0):
        for fused in (True, False):
            name = f"opt-{'fused' if fused else 'default'}-{pair}"
            cfg = _config(data, args.out / "runs", name, steps=args.opt_steps, every=0, **kw)
            gaps = _gaps(_timed_run(cfg, background=True, fused=fused), 0)
            result[name] = {**gaps, "img_s": args.batch / gaps["normal_median_s"]}
            shutil.rmtree(args.out / "runs" / name)
            print(name, json.dumps(result[name]), flush=True)
    (args.out / f"save_gap-{args.parts.replace(',', '-')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
