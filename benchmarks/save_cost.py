"""What a background checkpoint save costs training in all, and whether the host has idle CPU to hide it in.

    python benchmarks/save_cost.py --out /tmp/save-cost --pairs 3

The save-gap row (`fastft bench --only save-gap`) times the step at a save against a normal step. This asks two
further questions of the same run (resnet50 full fine-tune, AdamW, random weights, fp32 on the CPU; the row's config
from `fastft.benchmark.save_gap.gap_config`), in alternated rounds of three runs each:

- `none`: no step saves (`checkpoint.every_steps = 0`);
- `background`: fastft's default, a save every `--every` steps written by the writer thread;
- `idle`: the same, the writer thread at the lowest CPU priority (Linux SCHED_IDLE): it then runs only when a core
  would otherwise be idle. If training left a core idle, the write would vanish from the step times there; if the
  cores are saturated, the writer starves until the next save waits for it.

Per run: the optimizer steps' intervals (between two entries into the loop's `after_step`) less the first two; their
sum against the `none` run's of the same round gives the training time each save cost in all, wherever it landed."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from fastft.benchmark import cases
from fastft.benchmark.save_gap import gap_config, gaps, timed_run

MODES = ("none", "background", "idle")


def _idle_run(real):
    def run(self, path, write):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only (Linux: per-thread policy)
        return real(self, path, write)

    return run


def one_run(root: Path, out: Path, mode: str, args) -> dict:
    import fastft.saver

    every = 0 if mode == "none" else args.every
    kw = dict(model=args.model, steps=args.steps, size=args.size, batch=args.batch, optim="adamw", workers=0)
    cfg = gap_config(root, out, mode, every=every, loader="torch", precision="fp32", device=torch.device("cpu"), **kw)
    costs: dict = {}
    patch = mock.patch.object(fastft.saver.Writer, "_run", _idle_run(fastft.saver.Writer._run))
    with patch if mode == "idle" else contextlib.nullcontext():
        marks = timed_run(cfg, background=True, device=torch.device("cpu"), costs=costs)
    iv = [b - a for a, b in itertools.pairwise(marks)][2:]  # less the first two (warm-up)
    saves = [s for s in range(3, len(marks)) if every and s % every == 0]  # saves inside the timed intervals
    g = gaps(marks, every) if every else {}
    return {
        "total_s": sum(iv),
        "intervals_s": iv,
        "saves_timed": len(saves),
        "at_save_median_s": g.get("at_save_median_s"),
        "normal_median_s": g.get("normal_median_s", statistics.median(iv)),
        "save_on_training_thread_s": costs.get("save_s", []),
        "write_cpu_s": costs.get("write_cpu_s", []),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", type=int, default=3, help="alternated rounds (none, background, idle)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = cases.bench_folder(args.steps * args.batch, 4)
    rounds = []
    start = time.time()
    for r in range(args.pairs):
        order = MODES if r % 2 == 0 else tuple(reversed(MODES))
        got = {}
        for mode in order:
            with tempfile.TemporaryDirectory(dir=args.out) as tmp:
                got[mode] = one_run(root, Path(tmp), mode, args)
            m = got[mode]
            print(f"round {r} {mode}: {m['total_s']:.2f} s over {len(m['intervals_s'])} steps", flush=True)
        for mode in ("background", "idle"):
            n = got[mode]["saves_timed"]
            got[mode]["cost_per_save_s"] = (got[mode]["total_s"] - got["none"]["total_s"]) / n if n else None
        rounds.append(got)
    record = {
        "command": "python benchmarks/save_cost.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "host": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "seconds": time.time() - start,
        "rounds": rounds,
    }
    (args.out / "save_cost.json").write_text(json.dumps(record, indent=1) + "\n")
    print("| round | none: steps (s) | background: steps (s) | cost per save | idle: steps (s) | cost per save |")
    for r, g in enumerate(rounds):
        print(
            f"| {r} | {g['none']['total_s']:.2f} | {g['background']['total_s']:.2f} | "
            f"{g['background']['cost_per_save_s']:.3f} | {g['idle']['total_s']:.2f} | "
            f"{g['idle']['cost_per_save_s']:.3f} |"
        )
    for mode in ("background", "idle"):
        at = [g[mode]["at_save_median_s"] for g in rounds]
        on = [statistics.median(g[mode]["save_on_training_thread_s"]) for g in rounds]
        cpu = [statistics.median(g[mode]["write_cpu_s"]) for g in rounds]
        print(f"{mode}: step at a save {at}, save() on the training thread {on}, write CPU {cpu}")


if __name__ == "__main__":
    main()
