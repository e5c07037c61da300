"""The run folder: pick it (and the checkpoint to resume from), refuse or clear it, check free space, open it."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch

from fastft import outputs
from fastft.config import FinetuneConfig, to_toml
from fastft.errors import ConfigError
from fastft.parallel import env as penv
from fastft.report import atomic_write_text

log = logging.getLogger("fastft")


def prepare_run_dir(cfg: FinetuneConfig, env: penv.DistEnv) -> tuple[Path, Path | None]:
    """Pick the run folder and the checkpoint to resume from; fail before any training if it is unusable."""
    resume = cfg.checkpoint.resume
    if resume and resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"checkpoint.resume: no such checkpoint {path}")
        return path.parent, path
    if cfg.run.name:
        name = cfg.run.name
    elif resume == "auto":  # the same command finds its folder again (a requeued or restarted job)
        name = default_run_name(cfg)
    else:
        name = f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name = penv.broadcast_object(env, name)  # ranks may disagree on the clock
    run_dir = Path(cfg.run.out_dir) / name
    if resume == "auto" and (run_dir / "last.pt").is_file():
        return run_dir, run_dir / "last.pt"
    if env.is_main:  # checks only: open_run_dir makes (or clears, with --overwrite) the folder after every check
        if _restarting(cfg, run_dir):
            log.info("fastft: %s holds no checkpoint yet (stopped before its first save): starting", run_dir)
        overwrite = cfg.run.overwrite or _restarting(cfg, run_dir)
        outputs.check_run_dir(run_dir, overwrite=overwrite, inputs=outputs.run_inputs(cfg))
        outputs.check_run_not_in_data(run_dir, cfg.data)
    return run_dir, None


# Keys that do not change what is trained: left out of the default run name, so a restarted command finds its run.
_NAME_EXCLUDES = {
    "run": ("name", "out_dir", "overwrite", "device"),
    "checkpoint": ("resume", "every_steps", "every_epochs"),
    "data": ("workers",),
    "parallel": ("timeout_s",),
    "log": None,  # the whole section
}


def default_run_name(cfg: FinetuneConfig) -> str:
    """`<model>-<hash>`: a short hash of the resolved config without the keys in _NAME_EXCLUDES."""
    import hashlib
    import json

    resolved = dataclasses.asdict(cfg)
    for section, keys in _NAME_EXCLUDES.items():
        if keys is None:
            resolved.pop(section, None)
        for key in keys or ():
            resolved.get(section, {}).pop(key, None)
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-{digest}"


def _restarting(cfg: FinetuneConfig, run_dir: Path) -> bool:
    """`resume=auto` without a run name, and the derived folder holds only fastft's outputs: the same command stopped
    before its first save, so it starts again there (a folder holding anything else is still refused)."""
    return cfg.checkpoint.resume == "auto" and not cfg.run.name and run_dir.is_dir() and outputs.only_outputs(run_dir)


def check_free_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the run folder cannot hold a checkpoint (model + optimizer state, written via a temp
    file next to the previous one) and the exports: better now than after an hour of training."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = 3 * (params + buffers + 2 * trainable) + (params + buffers)
    free = shutil.disk_usage(outputs.existing_ancestor(run_dir)).free  # the folder is made after the checks
    if free < need:
        raise ConfigError(
            f"run folder {run_dir}: not enough free space ({free / 2**20:.0f} MiB free, about "
            f"{need / 2**20:.0f} MiB needed for checkpoints and exports)"
        )


def open_run_dir(
    cfg: FinetuneConfig, run_dir: Path, *, model: torch.nn.Module, resuming: bool, skipped: list[str]
) -> None:
    """On rank 0, after every check (a refused run leaves the folder as it was, or absent): check the free space,
    make (or clear, with --overwrite) the folder, list skipped files, drop temp files of a killed save, and write
    the resolved config.toml (replaced whole, also on resume)."""
    check_free_space(run_dir, model)
    outputs.open_run_dir(run_dir, overwrite=(cfg.run.overwrite or _restarting(cfg, run_dir)) and not resuming)
    if skipped:
        atomic_write_text(run_dir / "skipped_files.txt", "".join(f"{p}\n" for p in skipped))
        log.info("fastft: skipped %d unreadable files (listed in %s)", len(skipped), run_dir / "skipped_files.txt")
    for tmp in run_dir.glob(".*.tmp*"):  # left by a process killed mid-save
        tmp.unlink(missing_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))
