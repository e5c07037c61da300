"""torch.compile for the trainable part, with static shapes (ragged batches are dropped or padded by the caller), and
`compile.target = auto` decided by measurement on the machine that runs (see choose_target)."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastft.config import CompileConfig

log = logging.getLogger("fastft")

# A trial compiles once (tens of seconds on a CPU): runs shorter than this keep the static rule rather than pay it.
TRIAL_MIN_STEPS = 200
TRIAL_WARMUP, TRIAL_STEPS = 2, 3  # forward+backward steps per side: warm-up (the compile included), then timed


def resolve_target(cfg: CompileConfig, device: torch.device) -> str:
    """The target without a trial. `auto`: the trainable part on CUDA, nothing on CPU (where a trial, when the run is
    long enough, decides instead: choose_target)."""
    if cfg.target != "auto":
        return cfg.target
    return "head" if device.type == "cuda" else "none"


def apply_compile(module: nn.Module, cfg: CompileConfig) -> nn.Module:
    """Compile `module` with fixed shapes.

    dynamic=False: training drops the ragged last batch and evaluation pads it to the full batch size, so one
    graph serves every step and no recompile happens mid-epoch."""
    return torch.compile(module, mode=None if cfg.mode == "default" else cfg.mode, backend=cfg.backend, dynamic=False)


def choose_target(
    cfg: CompileConfig,
    device: torch.device,
    suffix: nn.Module,
    example: Callable[[], torch.Tensor] | None,
    *,
    precision,
    key: dict,
    total_steps: int,
    cache_file: Path | None,
    timer: Callable[[], float] = time.perf_counter,
    min_steps: int | None = None,
) -> str:
    """`head` or `none` for compile.target = auto, by what measures faster here; any other target is returned as set.

    On first use for `key` (model, split, device, dtype, input shape, torch version, compile settings) the trainable
    part runs a few eager and a few compiled forward+backward steps on `example()` (its input; None: no trial) and the
    measured seconds are cached in `cache_file` (JSON), so a later run with the same key pays no trial. `head` is
    chosen when the compiled step is faster and the run's `total_steps` win back the compile time; the log says why,
    with both figures. Runs under `min_steps` (default TRIAL_MIN_STEPS) with no cached figures, and runs without an
    example, keep the static rule (resolve_target). The module's weights, buffers and gradients are as before the
    trial."""
    if cfg.target != "auto":
        return cfg.target
    min_steps = TRIAL_MIN_STEPS if min_steps is None else min_steps
    name = json.dumps(key, sort_keys=True)
    figures = _read_cache(cache_file).get(name)
    source = f"cached in {cache_file}"
    if figures is None:
        if example is None or total_steps < min_steps:
            target = resolve_target(cfg, device)
            why = "no trial for this input" if example is None else f"a run of {total_steps} steps (< {min_steps})"
            log.info("fastft: compile.target=auto -> %s (%s: the %s default)", target, why, device.type)
            return target
        figures = trial(suffix, example(), cfg=cfg, precision=precision, timer=timer)
        _write_cache(cache_file, name, figures)
        source = "measured now" + (f", cached in {cache_file}" if cache_file is not None else "")
    target, why = decide(figures, total_steps)
    log.info("fastft: compile.target=auto -> %s: %s (%s)", target, why, source)
    return target


def decide(figures: dict[str, float], total_steps: int) -> tuple[str, str]:
    """The target from a trial's figures, and the reason in words."""
    eager, compiled, compile_s = figures["eager_ms"], figures["compiled_ms"], figures["compile_s"]
    both = f"compiled {compiled:.1f} ms/step vs eager {eager:.1f} ms/step"
    if compiled >= eager:
        return "none", f"eager is faster ({both})"
    won = (eager - compiled) / 1000 * total_steps
    if won < compile_s:
        return "none", f"{both}, but {total_steps} steps win back {won:.1f} s of the {compile_s:.1f} s compile"
    return "head", f"compiled is faster ({both}; compile {compile_s:.1f} s)"


def trial(
    suffix: nn.Module,
    x: torch.Tensor,
    *,
    cfg: CompileConfig,
    precision,
    timer: Callable[[], float] = time.perf_counter,
    warmup: int = TRIAL_WARMUP,
    steps: int = TRIAL_STEPS,
) -> dict[str, float]:
    """Seconds per training forward+backward of `suffix` on `x`, eager and compiled; its state is restored after."""
    state = {k: v.detach().clone() for k, v in suffix.state_dict().items()}  # BatchNorm statistics move in train
    was_training = suffix.training
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    cuda = x.device.type == "cuda"

    def step(module: nn.Module) -> None:
        with precision.autocast():
            out = module(x)
        loss = F.cross_entropy(out.float(), labels) if out.ndim == 2 else out.float().mean()
        loss.backward()

    def timed(module: nn.Module, n: int) -> float:
        _sync(cuda)
        t = timer()
        for _ in range(n):
            step(module)
        _sync(cuda)
        return timer() - t

    suffix.train()
    try:
        with torch.random.fork_rng(devices=[x.device] if cuda else []):  # dropout draws leave the run's streams alone
            for _ in range(warmup):
                step(suffix)
            eager = timed(suffix, steps) / steps
            compiled_module = apply_compile(suffix, cfg)
            compile_s = timed(compiled_module, 1)  # the compile itself (and the first compiled step)
            for _ in range(warmup - 1):
                step(compiled_module)
            compiled = timed(compiled_module, steps) / steps
    finally:
        suffix.load_state_dict(state)
        suffix.train(was_training)
        for p in suffix.parameters():
            p.grad = None
    return {"eager_ms": 1000 * eager, "compiled_ms": 1000 * compiled, "compile_s": compile_s}


def trial_key(cfg, *, device: torch.device, precision, suffix: nn.Module, shape: tuple[int, ...]) -> dict:
    """What a cached decision is valid for: model, split (the trainable tensors), device, dtype, input shape, torch."""
    trainable = sum(p.numel() for p in suffix.parameters() if p.requires_grad)
    return {
        "model": f"{cfg.model.source}:{cfg.model.name}",
        "split": f"{cfg.model.freeze}|{trainable}",
        "device": _device_name(device),
        "dtype": precision.name,
        "shape": list(shape),
        "torch": torch.__version__,
        "compile": f"{cfg.compile.mode}|{cfg.compile.backend}",
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.processor() or platform.machine()}:{_cpu_model()}:{torch.get_num_threads()}t"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("fastft: %s is not readable JSON: measuring compile.target=auto again", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path | None, name: str, figures: dict[str, float]) -> None:
    """Add one decision's figures to the cache file (temp file + rename: a reader never sees half a file)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_cache(path), name: figures}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache folder costs the next run a trial, nothing else
        log.warning("fastft: could not cache the compile.target=auto figures in %s: %s", path, e)


def run_target(cfg, env, split, precision, *, spec, total_steps: int, sweep: bool) -> str:
    """compile.target for a run: choose_target on rank 0 (trial or cache), the same answer on every rank.

    The trial's input is a batch of random images through the frozen prefix; text models and head sweeps (no single
    image input, several heads) keep the static rule."""
    import torch.distributed as dist

    from fastft.inputs import _default_cache

    target = cfg.compile.target
    crop_size = getattr(spec, "crop_size", 0)  # text models have none
    if target == "auto" and env.is_main:
        example = None
        if crop_size and not sweep:
            example = _example(split.prefix, cfg, env.device, precision, crop_size)
        shape = (cfg.data.batch_size, 3, crop_size, crop_size)  # the images the prefix takes: no forward for a key
        target = choose_target(
            cfg.compile,
            env.device,
            split.suffix,
            example,
            precision=precision,
            key=trial_key(cfg, device=env.device, precision=precision, suffix=split.suffix, shape=shape),
            total_steps=total_steps,
            cache_file=_default_cache() / "compile_auto.json",
        )
    if cfg.compile.target == "auto" and env.distributed and dist.is_initialized():
        box = [target]
        dist.broadcast_object_list(box, src=0)
        target = box[0]
    return target


def _example(
    prefix: nn.Module | None, cfg, device: torch.device, precision, crop_size: int
) -> Callable[[], torch.Tensor]:
    """The trainable part's input for one batch: random images through the frozen prefix (made once, on first call)."""
    made: list[torch.Tensor] = []

    def make() -> torch.Tensor:
        if not made:
            g = torch.Generator().manual_seed(0)  # the run's own random streams are not drawn from
            images = torch.randn(cfg.data.batch_size, 3, crop_size, crop_size, generator=g).to(device)
            if cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if prefix is None:
                made.append(images)
            else:
                was_training = prefix.training
                prefix.eval()  # frozen: its BatchNorm statistics must not see these images
                with torch.inference_mode(), precision.autocast():
                    feats = prefix(images)
                prefix.train(was_training)
                made.append(feats.clone())  # a normal tensor: autograd may save it
        return made[0]

    return make
