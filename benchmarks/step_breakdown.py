"""Where a training step's time goes, measured inside fastft's own loop, and each step-path change side by side.

    python -m benchmarks.step_breakdown --out benchmarks/results/step-breakdown-<yyyymmdd>.md

Each case is a real run state from `fastft.trainer.setup` (random weights, nothing downloaded) whose epochs are run by
`fastft.trainer.train_one_epoch` itself; only the pieces it calls are wrapped with perf_counter (exclusive times: a
piece called inside another is charged to itself only):

- data wait: `next()` on the training loader; H2D: `inputs.to_device`; frozen prefix forward: `inputs.features`;
  trainable forward: the wrapped suffix and the loss; backward: `backend.backward`;
- finiteness check: `backend.grads_finite` (and, in the "old pass" variant, the full gradient-norm pass the step made
  before it was removed, `torch.nn.utils.get_total_norm` over every gradient + an isfinite flag);
- optimizer step: the rest of `backend.step` (clip when on, `optimizer.step`, `zero_grad`);
- scheduler/log: the rest of `after_step` (LR schedule, EMA, the step event at its cadence);
- other: the epoch's wall time less all of the above (the loop itself, loss bookkeeping, the loss isfinite check).

The first epoch of every case is a warm-up; then the cases of a table run one epoch each in turn (alternated), repeated;
figures are medians over the repeats of the per-step mean of an epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from fastft import optim as fastft_optim
from fastft import trainer
from fastft.config import FinetuneConfig
from fastft.data.synthetic import make_image_folder
from fastft.parallel import env as penv
from fastft.precision import cpu_has_native_bf16

PIECES = ("data", "h2d", "frozen", "fwd", "bwd", "finite", "optim", "sched_log", "other")
HEADER = (
    "data wait",
    "H2D",
    "frozen fwd",
    "trainable fwd",
    "backward",
    "finite check",
    "optimizer",
    "sched/log",
    "other",
)
PARTIAL = {"resnet50": "until:layer3", "vit_b_16": "until:encoder.layers.encoder_layer_10"}


@dataclass
class Variant:
    label: str
    model: str
    mode: str  # partial | full
    image_size: int
    overrides: dict = field(default_factory=dict)  # dotted config keys
    kernel: dict | None = None  # optimizer step kernel forced (None: fastft's choice)
    old_finite_pass: bool = False


class Clock:
    """Exclusive wall time per named piece: time spent in a wrapped piece nested inside another is not charged twice."""

    def __init__(self, device: torch.device) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []
        self._cuda = device.type == "cuda"

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.span(name):
                return fn(*args, **kwargs)

        return timed

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        self._sync()
        t = time.perf_counter()
        self._stack.append(0.0)
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - t
            self.totals[name] += elapsed - self._stack.pop()
            if self._stack:
                self._stack[-1] += elapsed

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()


class TimedLoader:
    """The run's training loader with `next()` charged to `data`; everything else passes through."""

    def __init__(self, loader, clock: Clock) -> None:
        self._loader, self._clock = loader, clock

    def __iter__(self):
        it = iter(self._loader)
        while True:
            with self._clock.span("data"):
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def _config(v: Variant, root: Path, out: Path, args) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights = v.model, "none"
    cfg.model.freeze = PARTIAL[v.model] if v.mode == "partial" else "none"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size = str(root), v.image_size, args.batch_size
    cfg.data.loader, cfg.data.workers = "torch", args.workers
    cfg.optim.name, cfg.optim.epochs = "adamw", 1 + args.repeats
    cfg.compile.target = "none"
    cfg.checkpoint.every_epochs = 0
    cfg.run.out_dir, cfg.run.name, cfg.run.overwrite, cfg.run.device = str(out), v.label.replace(" ", "_"), True, "cpu"
    cfg.log.progress, cfg.log.tensorboard, cfg.log.every_steps = False, False, 10
    for key, value in v.overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


class Case:
    """One run state with its pieces wrapped; `epoch()` runs fastft's epoch and returns per-step seconds per piece."""

    def __init__(self, v: Variant, root: Path, out: Path, args, env, opened: list) -> None:
        self.v = v
        cfg = _config(v, root, out / v.label.replace(" ", "_"), args)
        kernel = fastft_optim.step_kernel
        if v.kernel is not None:
            fastft_optim.step_kernel = lambda *a, k=v.kernel, **kw: dict(k)
        try:
            self.run = trainer.setup(cfg, env, opened)
        finally:
            fastft_optim.step_kernel = kernel
        self.clock = Clock(env.device)
        self._wrap()
        self.epoch_no = 0
        self.steps: list[dict[str, float]] = []

    def _wrap(self) -> None:
        run, clock = self.run, self.clock
        run.inputs.train = TimedLoader(run.inputs.train, clock)
        run.inputs.to_device = clock.wrap("h2d", run.inputs.to_device)
        run.inputs.features = clock.wrap("frozen", run.inputs.features)
        run.train_module = clock.wrap("fwd", run.train_module)
        run.loss = clock.wrap("fwd", run.loss)
        run.backend.backward = clock.wrap("bwd", run.backend.backward)
        run.backend.grads_finite = clock.wrap("finite", run.backend.grads_finite)
        step = run.backend.step
        if self.v.old_finite_pass:
            step = _with_old_pass(run, clock, step)
        run.backend.step = clock.wrap("optim", step)

    def epoch(self) -> dict[str, float]:
        self.clock.totals.clear()
        steps0 = self.run.step
        after_step = trainer.after_step
        trainer.after_step = self.clock.wrap("sched_log", after_step)
        try:
            t = time.perf_counter()
            trainer.train_one_epoch(self.run, self.epoch_no)
            wall = time.perf_counter() - t
        finally:
            trainer.after_step = after_step
        self.epoch_no += 1
        n = self.run.step - steps0
        row = {k: self.clock.totals.get(k, 0.0) / n for k in PIECES if k != "other"}
        row["other"] = wall / n - sum(row.values())
        row["total"] = wall / n
        return row


def _with_old_pass(run, clock: Clock, step: Callable) -> Callable:
    """The step as it was before the check was folded away: a total gradient norm of every gradient, every step."""
    flag: list[torch.Tensor] = []

    def old_step(boundary: bool = True) -> bool:
        if boundary:
            with clock.span("finite"):
                grads = [p.grad for g in run.optimizer.param_groups for p in g["params"] if p.grad is not None]
                bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
                flag[:] = [bad if not flag else flag[0] | bad]
        return step(boundary)

    return old_step


def measure(variants: list[Variant], root: Path, out: Path, args, log) -> dict[str, list[dict[str, float]]]:
    """Warm each case one epoch, then alternate one timed epoch per case, `args.repeats` times."""
    env = penv.init_distributed("cpu")
    opened: list = []
    rows: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
    try:
        cases = [Case(v, root, out, args, env, opened) for v in variants]
        for c in cases:
            t = time.perf_counter()
            c.epoch()
            log(f"warm-up {c.v.label}: {time.perf_counter() - t:.1f} s")
        for r in range(args.repeats):
            for c in cases if r % 2 == 0 else reversed(cases):
                row = c.epoch()
                rows[c.v.label].append(row)
                log(f"repeat {r} {c.v.label}: {1000 * row['total']:.0f} ms/step")
    finally:
        for source in opened:
            source.close()
        penv.shutdown(env)
    return rows


def median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in (*PIECES, "total")}


def tables(args) -> dict[str, list[Variant]]:
    rs, vs = args.resnet_size, args.vit_size
    r50 = {"model": "resnet50", "image_size": rs}
    breakdown = [
        Variant("resnet50 partial", mode="partial", **r50),
        Variant("resnet50 full", mode="full", **r50),
        Variant("vit_b_16 partial", "vit_b_16", "partial", vs),
        Variant("vit_b_16 full", "vit_b_16", "full", vs),
    ]
    full = {"mode": "full", **r50}
    optim = [
        Variant("for-loop step", kernel={"foreach": False}, **full),
        Variant("foreach step", kernel={"foreach": True}, **full),
        Variant("fused step (fastft)", **full),
        Variant("old grad-norm pass", old_finite_pass=True, **full),
    ]
    layout = [
        Variant("channels_last bf16 (fastft)", **full),
        Variant("NCHW bf16", overrides={"model.channels_last": False}, **full),
        Variant("channels_last fp32", overrides={"precision.dtype": "fp32"}, **full),
        Variant("NCHW fp32", overrides={"model.channels_last": False, "precision.dtype": "fp32"}, **full),
    ]
    comp = [
        Variant("partial eager", mode="partial", **r50),
        Variant("partial compile head", mode="partial", overrides={"compile.target": "head"}, **r50),
    ]
    return {"breakdown": breakdown, "optimizer and finiteness": optim, "layout and precision": layout, "compile": comp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per timed epoch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--resnet-size", type=int, default=128)
    p.add_argument("--vit-size", type=int, default=224)
    p.add_argument("--tables", default="breakdown,optimizer and finiteness,layout and precision,compile")
    args = p.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = [Path("/proc/loadavg").read_text().split()[:3]]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_image_folder(
            tmp / "data",
            num_classes=4,
            train_per_class=args.steps * args.batch_size // 4,
            val_per_class=1,
            image_size=max(args.resnet_size, args.vit_size) + 32,
        )
        for name, variants in tables(args).items():
            if name not in args.tables.split(","):
                continue
            results[name] = measure(variants, root, tmp / "runs", args, log=lambda s: print(s, flush=True))
            load.append(Path("/proc/loadavg").read_text().split()[:3])
            write_record(Path(args.out), args, results, load, started)  # after each table: a stopped run keeps it


def write_record(out: Path, args, results: dict, load: list, started: str) -> None:
    from benchmarks.machine import cpu_name

    cmd = (
        f"python -m benchmarks.step_breakdown --out {args.out} --batch-size {args.batch_size} --steps {args.steps}"
        f" --repeats {args.repeats} --workers {args.workers} --resnet-size {args.resnet_size} --vit-size"
        f" {args.vit_size}"
    )
    lines = [
        f"# Per-step time breakdown inside fastft's loop ({started})",
        "",
        f"Command: `PYTHONPATH=. {cmd}`",
        "",
        f"Hardware: {cpu_name()}, {torch.get_num_threads()} torch threads; AVX-512 BF16/AMX: "
        f"{'yes' if cpu_has_native_bf16() else 'no'} (fastft.precision.cpu_has_native_bf16, so precision auto = "
        f"{'bf16' if cpu_has_native_bf16() else 'fp32'}). Python {platform.python_version()}, torch"
        f" {torch.__version__}, torchvision {torchvision.__version__}.",
        "",
        "Load (`/proc/loadavg` 1/5/15 min) at the start and after each table: "
        + "; ".join(" ".join(x) for x in load)
        + ". The host is shared: other jobs' load is in every figure.",
        "",
        f"Random weights, AdamW, batch {args.batch_size}, torch loader over synthetic JPEGs with {args.workers}"
        f" worker(s), resnet50 at {args.resnet_size} px, vit_b_16 at {args.vit_size} px; partial = layer4 + fc"
        " (`until:layer3`) / the last encoder block + head (`until:encoder.layers.encoder_layer_10`); full = nothing"
        " frozen. Unless a row says otherwise: fastft's defaults on this CPU (precision auto, channels_last, fused"
        f" optimizer step, compile.target none). {args.steps} optimizer steps per epoch; one warm-up epoch per case,"
        f" then {args.repeats} alternated timed epochs; each cell is the median over those of the epoch's mean ms per"
        " step.",
        "",
    ]
    for name, rows in results.items():
        lines += [f"## {name}", "", "| case | " + " | ".join(HEADER) + " | step | img/s |", "|---" * 12 + "|"]
        for label, reps in rows.items():
            m = median_row(reps)
            cells = " | ".join(f"{1000 * m[k]:.1f}" for k in PIECES)
            lines.append(f"| {label} | {cells} | {1000 * m['total']:.0f} | {args.batch_size / m['total']:.1f} |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
