"""The step-time gap around a checkpoint save (synchronous write vs background write), and the optimizer step kernel
(fused vs torch's default), on a resnet50 full fine-tune on the CPU.

    python -m benchmarks.save_gap --out /tmp/save-gap --steps 30 --every 5

Nothing is downloaded: random weights, synthetic JPEGs. Every optimizer step's time is the interval between two
calls of the loop's after_step (which holds the save): the interval that starts at a save step holds that save. In
"sync" the file is written on the training thread (Checkpointer(background=False), the write before this change);
in "background" by the writer thread. The optimizer comparison runs without saves, fused vs unfused, alternating."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch
import torchvision

import fastft
from fastft.benchmark.save_gap import MODES, gap_config, gaps, timed_run
from fastft.data.synthetic import make_image_folder

CPU = torch.device("cpu")


def _config(data: Path, out: Path, name: str, *, steps: int, every: int, size: int, batch: int, optim: str):
    return gap_config(
        data, out, name, model="resnet50", steps=steps, every=every, size=size, batch=batch, optim=optim, workers=0,
        loader="auto", precision="fp32", device=CPU,
    )  # fmt: skip


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
    for mode in MODES if "saves" in args.parts else ():
        cfg = _config(data, args.out / "runs", mode, steps=args.steps, every=args.every, **kw)
        marks = timed_run(cfg, background=mode == "background", fused=True, device=CPU)
        result[mode] = gaps(marks, args.every)
        result[mode]["last_pt_bytes"] = (args.out / "runs" / mode / "last.pt").stat().st_size
        shutil.rmtree(args.out / "runs" / mode)
        print(mode, json.dumps(result[mode]), flush=True)
    for pair in range(args.pairs if "optimizer" in args.parts else 0):
        for fused in (True, False):
            name = f"opt-{'fused' if fused else 'default'}-{pair}"
            cfg = _config(data, args.out / "runs", name, steps=args.opt_steps, every=0, **kw)
            g = gaps(timed_run(cfg, background=True, fused=fused, device=CPU), 0)
            result[name] = {**g, "img_s": args.batch / g["normal_median_s"]}
            shutil.rmtree(args.out / "runs" / name)
            print(name, json.dumps(result[name]), flush=True)
    (args.out / f"save_gap-{args.parts.replace(',', '-')}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
