"""Optimizer, parameter groups (weight decay, layer-wise LR decay, per-unfreeze LR factors) and the LR schedule.

Every parameter group carries `lr_scale`; the schedule sets `lr = optim.lr * lr_scale * factor(step)` for every
group, including groups added later by gradual unfreezing."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastft.backbones.base import Stage
from fastft.backbones.freeze import module_stages
from fastft.config import OptimConfig

log = logging.getLogger("fastft")


def stage_depths(stages: Sequence[Stage]) -> dict[str, int]:
    """Depth of every stage parameter counted from the head: last stage 1, ..., first stage len(stages)."""
    return {n: len(stages) - i for i, stage in enumerate(stages) for n in stage.params}


def layer_depths(model: nn.Module, head: str, stages: Sequence[Stage] | None = None) -> dict[str, int]:
    """Depth of every parameter of `model`: head (and anything outside the stages) 0, stages as `stage_depths`.
    Without `stages`, those `build_model` pinned on the model, or the module tree's (fastft.backbones.freeze)."""
    if stages is None:
        stages = getattr(model, "fastft_stages", None) or [Stage("", tuple(g)) for g in module_stages(model, head)]
    depths = stage_depths(stages)
    for n, _ in model.named_parameters():
        depths.setdefault(n, 0)  # the head
    return depths


def param_groups(
    model: nn.Module,
    params: list[str],
    cfg: OptimConfig,
    *,
    head: str,
    stages: Sequence[Stage] | None = None,
    lr_factor: float = 1.0,
    tag: str = "",
) -> list[dict[str, Any]]:
    """Groups for `params` (names): weight decay for weights only (not biases/norms), and lr_scale =
    lr_factor * layer_decay ** depth, depth counted in the backbone's `stages` (see `layer_depths`). Group order
    is deterministic (an exact resume rebuilds the same groups)."""
    named = dict(model.named_parameters())
    depths = layer_depths(model, head, stages) if cfg.layer_decay != 1.0 else {}
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for n in params:
        p = named[n]
        key = (depths.get(n, 0), p.ndim > 1)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (depth, decay), ps in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        groups.append(
            {
                "params": ps,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": lr_factor * cfg.layer_decay**depth,
                "name": f"{tag}depth{depth}{'' if decay else '-nd'}",
            }
        )
    return groups


def step_kernel(device: torch.device | None, name: str = "adamw", *, scaled: bool = False) -> dict[str, bool]:
    """How the optimizer step runs on `device`: fused (one kernel over all parameters; torch has fused AdamW and SGD
    on CPU and CUDA) where torch supports it, else foreach on CUDA, else torch's default. None: torch's default
    (DeepSpeed wraps the optimizer and steps its own flat buffers). Each is deterministic, so a resumed run still
    matches an uninterrupted one bit for bit.

    `scaled` (fp16 with a GradScaler): never fused SGD. A fused optimizer skips an overflowed step inside its kernel,
    and fused SGD allocates its momentum buffers (uninitialised) before that kernel, so a skipped first step leaves
    garbage momentum that the next step then applies; the scaler skips an unfused step before it reaches the
    optimizer. (Fused AdamW zero-fills its state first and is unaffected.)"""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    if device is None:
        return {}
    fused_ok = not (scaled and name == "sgd")
    if fused_ok and device.type in ("cpu", "cuda") and device.type in _get_fused_kernels_supported_devices():
        return {"fused": True}
    return {"foreach": True} if device.type == "cuda" else {}


_logged: set[tuple[str, str, str]] = set()  # choices already logged (a head sweep builds two optimizers)


def build_optimizer(
    groups: list[dict[str, Any]], cfg: OptimConfig, *, device: torch.device | None = None, scaled: bool = False
) -> torch.optim.Optimizer:
    """SGD or AdamW over `groups`, stepped by `step_kernel(device, ...)` (logged once per optimizer and device);
    `scaled`: the loss is scaled (fp16 with a GradScaler)."""
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    kernel = step_kernel(device, cfg.name, scaled=scaled)
    key = (cfg.name, str(device), ",".join(kernel) or "default")
    if key not in _logged:
        _logged.add(key)
        log.info("fastft: optimizer %s on %s: %s step", cfg.name, device or "its backend", key[2])
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **kernel)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kernel)


def fit_step_counts(optimizer: torch.optim.Optimizer) -> None:
    """After loading a state saved by another step kernel: a fused step keeps its step counts as float32 on the
    parameter's device, the others as a CPU tensor (load_state_dict places them by the saved groups' kernel)."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor) and g.get("fused"):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


class Schedule:
    """Linear warmup then cosine decay to lr * min_lr_ratio (or constant); one `step()` per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.step_count = 0
        self.apply()

    def factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self) -> None:
        f = self.factor(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg.lr * g.get("lr_scale", 1.0) * f

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
