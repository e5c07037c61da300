"""Resuming with a changed config: one table decides, for every config key, what a change means.

- ``must-match``: the saved state or position cannot carry over (optimizer groups, weights' shapes, the sample
  order); a change is refused with one line naming the key, the saved value and the new one.
- ``may-change``: applied from here on (epochs, max_steps, LR and schedule, logging, cadence, loader workers, ...).
- ``may-change-noted``: applied, with a consequence that is logged as one line (precision: a fp16 loss-scaler state
  is dropped or started fresh; best_metric: the best so far is reset; ...).

A key missing from the table is treated as must-match at run time, and tests/test_resume_compat.py fails until it is
classified. The README's "Resuming with a changed config" lists the same table.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastft.config import FinetuneConfig
from fastft.errors import ConfigError
from fastft.optim import fit_step_counts

log = logging.getLogger("fastft")

MUST, MAY, NOTED = "must-match", "may-change", "may-change-noted"


@dataclass(frozen=True)
class Rule:
    kind: str
    why: str = ""  # must-match: why it cannot change; noted: what happens when it does
    same: Callable[[Any, Any], bool] | None = None  # equality that ignores differences without effect


def _either_deepspeed(a: Any, b: Any) -> bool:
    return (a == "deepspeed") == (b == "deepspeed")  # auto/none/ddp keep the same state; DeepSpeed keeps its own


def _inferred_or_equal(a: Any, b: Any) -> bool:
    return a == b or 0 in (a, b)  # 0 = inferred from the data; the class list is checked against the checkpoint


_GROUPS = "the optimizer's parameter groups and their state are built from it"
_AUG = "the rest of the run trains with the new augmentation: not bit-identical to an uninterrupted run"
_ORDER = "the saved position in the epoch means the same samples only with the same value"

RULES: dict[str, Rule] = {
    "model.source": Rule(MUST, "the saved weights are this source's model"),
    "model.name": Rule(MUST, "the saved weights are this model's"),
    "model.weights": Rule(
        MUST,
        "it picks the preprocessing preset (crop size, mean/std) the run trained with, and a probe checkpoint's "
        "frozen part is rebuilt from it",
    ),
    "model.num_classes": Rule(MUST, "the head's shape", same=_inferred_or_equal),
    "model.freeze": Rule(MUST, _GROUPS),
    "model.head_hidden": Rule(MUST, "the head's shape"),
    "model.head_dropout": Rule(MAY),
    "model.channels_last": Rule(MAY),
    "model.fold_bn": Rule(MAY),
    "model.grad_checkpointing": Rule(MAY),
    "model.activation_checkpointing": Rule(MAY),
    "model.drop_path": Rule(MAY),
    "head.sweep_lr": Rule(MUST, "the bank of heads and its optimizer groups"),
    "head.sweep_weight_decay": Rule(MUST, "the bank of heads and its optimizer groups"),
    "data.root": Rule(
        NOTED, "the classes must match (checked); other files change the samples the rest of the run sees"
    ),
    "data.train_dir": Rule(MUST, "the train/val split"),
    "data.val_dir": Rule(MUST, "the train/val split"),
    "data.val_fraction": Rule(MUST, "the train/val split"),
    "data.train_list": Rule(
        NOTED, "the classes must match (checked); other files change the samples the rest of the run sees"
    ),
    "data.val_list": Rule(NOTED, "the classes must match (checked); other files change the evaluation set"),
    "data.image_size": Rule(MUST, "the transform the weights were trained with"),
    "data.max_length": Rule(MUST, "the token sequences the weights were trained with (and the length buckets)"),
    "data.batch_size": Rule(MUST, _ORDER),
    "data.eval_batch_size": Rule(MAY),
    "data.workers": Rule(MAY),
    "data.loader": Rule(
        NOTED, "the other loader draws its own augmentation: not bit-identical to an uninterrupted run"
    ),
    "data.augment": Rule(NOTED, "the rest of the run trains on the new transform"),
    "data.pin_memory": Rule(MAY),
    "data.persistent_workers": Rule(MAY),
    "data.sampler": Rule(MUST, _ORDER),
    "data.task": Rule(MUST, "the head's loss and targets (one class or a set of labels per image)"),
    "data.on_bad_file": Rule(NOTED, "a file skipped (or not) changes the samples the rest of the run sees"),
    "augment.policy": Rule(NOTED, _AUG),
    "augment.random_erase": Rule(NOTED, _AUG),
    "augment.color_jitter": Rule(NOTED, _AUG),
    "augment.mixup_alpha": Rule(NOTED, _AUG),
    "augment.cutmix_alpha": Rule(NOTED, _AUG),
    "augment.mix_prob": Rule(NOTED, _AUG),
    "optim.name": Rule(MUST, "the optimizer state (momentum buffers vs. Adam moments) is the saved optimizer's"),
    "optim.lr": Rule(MAY),
    "optim.momentum": Rule(MAY),
    "optim.weight_decay": Rule(MAY),
    "optim.betas": Rule(MAY),
    "optim.schedule": Rule(MAY),
    "optim.warmup_steps": Rule(MAY),
    "optim.min_lr_ratio": Rule(MAY),
    "optim.label_smoothing": Rule(MAY),
    "optim.loss": Rule(MAY),
    "optim.focal_gamma": Rule(MAY),
    "optim.class_weights": Rule(MAY),
    "optim.grad_accum": Rule(MUST, _ORDER),
    "optim.clip_grad_norm": Rule(MAY),
    "optim.epochs": Rule(MAY),
    "optim.max_steps": Rule(MAY),
    "optim.layer_decay": Rule(MUST, _GROUPS),
    "optim.unfreeze": Rule(MUST, _GROUPS),
    "optim.ema_decay": Rule(
        NOTED, "the average continues with the new decay (from 0: it starts at the resume step; to 0: it is dropped)"
    ),
    "optim.ema_every": Rule(MAY),
    "precision.dtype": Rule(NOTED, "a fp16 loss-scaler state is dropped (leaving fp16) or started fresh (entering it)"),
    "compile.target": Rule(MAY),
    "compile.mode": Rule(MAY),
    "compile.backend": Rule(MAY),
    "parallel.backend": Rule(
        MUST,
        "DeepSpeed keeps the optimizer state beside the file (auto, none, ddp: interchangeable)",
        same=_either_deepspeed,
    ),
    "parallel.timeout_s": Rule(MAY),
    "parallel.sync_bn": Rule(NOTED, "the trainable BatchNorm layers normalise with (or without) all ranks' statistics"),
    "parallel.deepspeed_config": Rule(MUST, "DeepSpeed's saved state follows its config"),
    "parallel.zero_stage": Rule(MUST, "DeepSpeed's saved state is partitioned by it"),
    "features.cache": Rule(NOTED, "the rest of the run trains with (or without) the cache: equal up to rounding"),
    "features.views": Rule(MUST, "the augmented views the cached run trains on"),
    "features.dtype": Rule(NOTED, "cached features are stored at the new precision: equal up to rounding"),
    "features.dir": Rule(MAY),
    "eval.threshold": Rule(
        NOTED, "metrics at a threshold (precision, recall, F1, ...) change; the best so far was judged at the old one"
    ),
    "eval.tune_thresholds": Rule(MAY),
    "checkpoint.every_epochs": Rule(MAY),
    "checkpoint.every_steps": Rule(MAY),
    "checkpoint.best_metric": Rule(
        NOTED, "the best so far was measured otherwise: it is reset, the next evaluation writes best.pt"
    ),
    "checkpoint.best_mode": Rule(
        NOTED, "the best so far was measured otherwise: it is reset, the next evaluation writes best.pt"
    ),
    "checkpoint.resume": Rule(MAY),
    "checkpoint.patience": Rule(MAY),
    "checkpoint.min_delta": Rule(MAY),
    "log.tensorboard": Rule(MAY),
    "log.progress": Rule(MAY),
    "log.every_steps": Rule(MAY),
    "log.step_timing": Rule(MAY),
    "run.out_dir": Rule(MAY),
    "run.name": Rule(MAY),
    "run.seed": Rule(MUST, _ORDER),
    "run.deterministic": Rule(MAY),
    "run.device": Rule(NOTED, "random streams of another device type start fresh: not bit-identical"),
    "run.overwrite": Rule(MAY),
    "run.eval_every_epochs": Rule(MAY),
}


def config_keys(cfg: FinetuneConfig | None = None) -> list[str]:
    """Every `section.key` of the config schema."""
    flat = dataclasses.asdict(cfg or FinetuneConfig())
    return [f"{s}.{k}" for s, values in flat.items() for k in values]


def classify(key: str) -> Rule:
    return RULES.get(key, Rule(MUST, "not classified for resuming, so treated as must-match"))


def changes(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key whose value differs. A key the checkpoint predates counts as its
    default, which is the behaviour the run had before the key existed (a new key never changes what a config that
    does not set it does); a checkpoint with no config at all is not compared."""
    if not saved:
        return []
    defaults = dataclasses.asdict(FinetuneConfig())
    out = []
    for section, values in now.items():
        old_section = saved.get(section, {})
        for key, new in values.items():
            old = old_section.get(key, defaults[section][key])
            if old != new:
                out.append((f"{section}.{key}", old, new))
    return out


def check_task(state: dict, task: str, *, path: Path) -> None:
    """A run may not change `data.task` on resume (checkpoints from before it were multiclass)."""
    saved = state["meta"].get("task", "multiclass")
    if saved != task:
        raise ConfigError(
            f"{path}: saved with data.task={saved!r}, this run has {task!r}; resume with the same value (or start a "
            f"new run): {RULES['data.task'].why}"
        )


def reconcile(state: dict, cfg: FinetuneConfig, *, world_size: int, path: Path, main: bool = True) -> list[str]:
    """Decide whether `state` can continue under `cfg`: refuse a must-match change (ConfigError, one line); apply the
    rest, logging the noted consequences (on `main` only). Returns the consequence lines."""
    saved = state["meta"].get("config", {})
    notes = []
    for key, old, new in changes(saved, dataclasses.asdict(cfg)):
        rule = classify(key)
        if rule.same is not None and rule.same(old, new):
            continue
        if rule.kind == MUST:
            raise ConfigError(
                f"{path}: saved with {key}={old!r}, this run has {new!r}; resume with the same value (or start a "
                f"new run): {rule.why}"
            )
        if rule.kind == NOTED:
            notes.append(f"{key} changed from {old!r} to {new!r} on resume: {rule.why}")
            if key.startswith("checkpoint.best_"):
                state["best"] = {"metric": cfg.checkpoint.best_metric, "value": None, "epoch": None}
    world = state["meta"].get("world_size")
    if world is not None and world != world_size and state["batch"]:
        raise ConfigError(
            f"{path}: saved mid-epoch by {world} processes, resumed by {world_size}; resume with "
            f"{world} processes (the position in the epoch depends on it)"
        )
    for line in notes if main else []:
        log.warning("fastft: %s", line)
    return notes


_HYPER = ("momentum", "weight_decay", "betas", "lr", "fused", "foreach")  # the step kernel: this device's


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load the saved optimizer state (moments, step counts) but keep this run's hyperparameters: load_state_dict
    would bring back the saved momentum / weight decay / betas, and those keys may change on resume."""
    mine = [{k: g[k] for k in _HYPER if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for g, values in zip(optimizer.param_groups, mine):
        g.update(values)
    fit_step_counts(optimizer)
