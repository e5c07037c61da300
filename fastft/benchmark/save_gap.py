"""The step-time gap around a checkpoint save: a full fine-tune with a save every few steps, the file written on the
training thread ("sync", `Checkpointer(background=False)`) and by the writer thread ("background", the default).

Every optimizer step's time is the interval between two calls of the loop's `after_step` (which holds the save); on a
GPU the device is synchronised before each mark, so an interval holds its step's device work. The interval that starts
at a save step holds that save ("at a save"), the one after it the next step; "normal" are the others, less the first
two (warm-up). Nothing is downloaded: random weights."""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from fastft.benchmark.measure import sync_for

TARGET = 1.1  # a step during a save <= 1.1 x a normal step
MODES = ("sync", "background")


def gap_config(
    root: Path,
    out: Path,
    name: str,
    *,
    model: str,
    steps: int,
    every: int,
    size: int,
    batch: int,
    optim: str,
    workers: int,
    loader: str,
    precision: str,
    device: torch.device,
):
    from fastft.config import FinetuneConfig

    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights, cfg.model.freeze = model, "none", "none"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(root), size, batch, workers
    cfg.data.loader = loader
    cfg.precision.dtype, cfg.compile.target = precision, "none"
    cfg.optim.name, cfg.optim.max_steps, cfg.optim.epochs = optim, steps, 100
    cfg.checkpoint.every_steps = every
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), name, str(device)
    cfg.log.progress, cfg.log.tensorboard = False, False
    return cfg.validate()


def timed_run(
    cfg, *, background: bool, fused: bool = True, device: torch.device, costs: dict | None = None
) -> list[float]:
    """Run `cfg` in this process; returns the optimizer steps' entry times into after_step. `costs` (a dict) gets
    each save's seconds on the training thread (`save_s`: check, gather, snapshot; the write too when sync) and each
    write's CPU seconds on the thread that writes (`write_cpu_s`: serialising, copying, fsync's CPU)."""
    import fastft.optim
    import fastft.saver
    import fastft.trainer
    from fastft.benchmark.measure import finetune_quiet
    from fastft.checkpoint import Checkpointer

    marks: list[float] = []
    real_after, sync = fastft.trainer.after_step, sync_for(device)
    costs = {} if costs is None else costs
    save_s, write_cpu_s = costs.setdefault("save_s", []), costs.setdefault("write_cpu_s", [])
    real_save, real_run = Checkpointer.save, fastft.saver.Writer._run

    def after_step(*args, **kwargs):
        sync()  # the step's device work belongs to its interval
        marks.append(time.perf_counter())
        return real_after(*args, **kwargs)

    def save(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return real_save(self, *args, **kwargs)
        finally:
            save_s.append(time.perf_counter() - t)

    def run(self, path, write):
        t = time.thread_time()
        try:
            return real_run(self, path, write)
        finally:
            write_cpu_s.append(time.thread_time() - t)

    patches = [
        mock.patch.object(fastft.trainer, "after_step", after_step),
        mock.patch.object(Checkpointer, "save", save),
        mock.patch.object(fastft.saver.Writer, "_run", run),
    ]
    if not background:
        sync_writer = functools.partial(Checkpointer, background=False)  # the write on the training thread
        patches.append(mock.patch.object(fastft.trainer, "Checkpointer", sync_writer))
    if not fused:
        patches.append(mock.patch.object(fastft.optim, "step_kernel", lambda *a, **k: {}))  # torch's default
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        finetune_quiet(cfg)
    return marks


def gaps(marks: list[float], every: int) -> dict:
    """Step intervals: [i] runs from after_step of step i+1 to that of step i+2 (1-based steps)."""
    iv = [b - a for a, b in itertools.pairwise(marks)]
    step_of = [i + 1 for i in range(len(iv))]  # the step whose after_step (and save) opens the interval
    at_save = [t for s, t in zip(step_of, iv) if every and s % every == 0]
    after_save = [t for s, t in zip(step_of, iv) if every and s % every == 1 and s > 1]
    normal = [t for s, t in zip(step_of, iv) if not every or s % every not in (0, 1)]
    normal = normal[2:] if len(normal) > 4 else normal  # the first steps warm up
    if not normal:
        raise ValueError("no step away from a save: use more steps or a larger save interval")
    med = statistics.median(normal)
    out = {"normal_median_s": med, "normal_s": normal, "normal_n": len(normal)}
    if at_save:
        out.update(
            at_save_s=at_save,
            at_save_median_s=statistics.median(at_save),
            ratio_at_save=statistics.median(at_save) / med,
            next_step_s=after_save,
            ratio_next_step=statistics.median(after_save) / med if after_save else None,
        )
    return out


def measure_modes(root: Path, work: Path, *, every: int, device: torch.device, say=print, **kw) -> dict:
    """The sync and background runs of the same config; each one's gaps and its checkpoint's size."""
    import shutil

    out: dict = {}
    for mode in MODES:
        cfg = gap_config(root, work / "runs", mode, every=every, device=device, **kw)
        costs: dict = {}
        marks = timed_run(cfg, background=mode == "background", device=device, costs=costs)
        out[mode] = gaps(marks, every)
        out[mode]["save_s"], out[mode]["write_cpu_s"] = costs["save_s"], costs["write_cpu_s"]
        out[mode]["last_pt_bytes"] = (work / "runs" / mode / "last.pt").stat().st_size
        shutil.rmtree(work / "runs" / mode)
        m = out[mode]
        say(
            f"save gap {mode}: normal step {m['normal_median_s']:.3f} s, at a save "
            f"{m.get('at_save_median_s', float('nan')):.3f} s, ratio {m.get('ratio_at_save', float('nan')):.2f}"
        )
    return out


def render(entry: dict) -> list[str]:
    """One row per mode: normal step median, steps at a save, their median, the ratios (markdown lines)."""
    lines = [
        "| write | normal step (median) | steps at a save (s) | median at a save | ratio at a save "
        "| ratio of the next step | save on the training thread (median) | write's CPU (median) | checkpoint |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        m = entry[mode]
        nxt = m.get("ratio_next_step")
        lines.append(
            f"| {mode} | {m['normal_median_s']:.3f} s | {', '.join(f'{t:.3f}' for t in m['at_save_s'])} | "
            f"{m['at_save_median_s']:.3f} s | {m['ratio_at_save']:.2f} | {'n/a' if nxt is None else f'{nxt:.2f}'} | "
            f"{_median_s(m.get('save_s'))} | {_median_s(m.get('write_cpu_s'))} | {m['last_pt_bytes'] / 1e6:.0f} MB |"
        )
    return lines


def _median_s(xs: list[float] | None) -> str:
    """A median in seconds for the table; n/a for a record from before these were kept."""
    return f"{statistics.median(xs):.3f} s" if xs else "n/a"


def run_row(g, s, *, device: torch.device, run_id: str, work: Path, say=print) -> dict:
    """The suite's row (a `suites.SaveGap`, on the suite's `Settings` and device); `ratio` is the background write's
    (fastft's default), `ratio_sync` the synchronous one's, each its own at-a-save median / normal median."""
    import tempfile

    from fastft.benchmark import cases, measure

    batch = g.batch_size or s.batch_size
    size = g.image_size or s.image_size
    workers = s.workers if g.workers is None else g.workers
    if g.train_images // batch < g.steps:
        raise ValueError(f"save gap: {g.train_images} images at batch {batch} make fewer than {g.steps} steps")
    root = cases.bench_folder(g.train_images, 4)
    say(f"save gap: {g.model} full fine-tune, {g.steps} steps saving every {g.every}, sync vs background write")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        modes = measure_modes(
            root,
            Path(tmp),
            model=g.model,
            steps=g.steps,
            every=g.every,
            size=size,
            batch=batch,
            optim=g.optim,
            workers=workers,
            loader=g.loader,
            precision=g.precision,
            device=device,
            say=say,
        )
    ratio = modes["background"]["ratio_at_save"]
    return {
        **measure.row_fields(g, run_id=run_id, batch=batch, workers=workers, image_size=size, device=device),
        **modes,
        "ratio": ratio,
        "ratio_sync": modes["sync"]["ratio_at_save"],
        "target": TARGET,
        "met": ratio <= TARGET,
    }
