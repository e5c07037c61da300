"""Checks that need the data or the model but not training: run once, after the model is built and before the first
step, so a run never fails (or silently does nothing) an epoch in.

Refused (ConfigError): a best metric the task's report does not have; an unfreeze entry naming no module, or falling
after the last epoch. Legal but surprising combinations get one warning line saying what will happen."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from fastft.config import FinetuneConfig, UnfreezeStep
from fastft.errors import ConfigError

log = logging.getLogger("fastft")


def check_best_metric(key: str, num_classes: int, *, task: str = "multiclass", tuned: bool = False) -> None:
    """`key` names a scalar of the report: ema/<key> the EMA model's (config validation checks it is on); with
    `tuned` (eval.tune_thresholds) tuned/<key> a metric at the per-label thresholds tuned on the same evaluation."""
    from fastft import thresholds
    from fastft.evaluation import report_keys

    keys = report_keys(num_classes, task=task)
    keys += [thresholds.PREFIX + k for k in thresholds.KEYS] if tuned else []
    if key.removeprefix("ema/") not in keys:
        kind = f"{num_classes}-label multilabel" if task == "multilabel" else f"{num_classes}-class"
        raise ConfigError(f"checkpoint.best_metric: {key!r} is not a report key of a {kind} task ({', '.join(keys)})")


def check_unfreeze_plan(plan: list[UnfreezeStep], model: nn.Module, *, epochs: int, start_epoch: int = 0) -> None:
    """Every entry names a module of this model and falls inside the run's epochs (1-based, as logged)."""
    for u in plan:
        try:
            model.get_submodule(u.module)
        except AttributeError:
            tops = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"optim.unfreeze: no module {u.module!r} in the model (top-level: {tops})") from None
        if u.epoch > epochs:
            raise ConfigError(
                f"optim.unfreeze: {u.epoch}:{u.module} falls after the run's last epoch ({epochs}), so it would never "
                "unfreeze: raise optim.epochs / optim.max_steps or drop the entry"
            )


def warnings_for(cfg: FinetuneConfig, *, world_size: int, total_steps: int) -> list[str]:
    """One line per legal but surprising combination, saying what will happen."""
    out = []
    if cfg.parallel.backend == "none" and world_size > 1:
        out.append(
            f"parallel.backend=none with {world_size} processes: each process trains its own copy on its shard of the "
            "data, gradients are not averaged, and rank 0's model is the one saved"
        )
    if cfg.features.views > 0 and not cfg.data.augment:
        out.append(
            f"features.views={cfg.features.views} with data.augment=false: the views are still augmented (random "
            "crops and flips) -- set features.views=0 for the plain eval transform"
        )
    if cfg.optim.warmup_steps >= total_steps:
        out.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} >= the run's {total_steps} steps: the LR never reaches "
            f"optim.lr (it ends at {cfg.optim.lr * total_steps / cfg.optim.warmup_steps:g})"
        )
    if cfg.data.loader == "synthetic":
        out.append(
            "data.loader=synthetic: training and evaluation reuse one random batch instead of the data folder's "
            "images (for throughput); the metrics mean nothing, and the report is marked synthetic_data=true"
        )
    return out


def check_before_training(
    cfg: FinetuneConfig,
    *,
    model: nn.Module,
    num_classes: int,
    plan: list[UnfreezeStep],
    epochs: int,
    total_steps: int,
    world_size: int,
    main: bool = True,
) -> None:
    """Refuse what would fail later (every rank); log one warning line per surprising combination (`main` only)."""
    check_best_metric(cfg.checkpoint.best_metric, num_classes, task=cfg.data.task, tuned=cfg.eval.tune_thresholds)
    check_unfreeze_plan(plan, model, epochs=epochs)
    if cfg.features.cache == "disk" and cfg.features.dir:  # an output target too: checked before the cache is built
        from fastft.outputs import check_writable

        check_writable(Path(cfg.features.dir), what="features.dir")
    for line in warnings_for(cfg, world_size=world_size, total_steps=total_steps) if main else []:
        log.warning("fastft: warning: %s", line)
