"""Optimizer, parameter groups (weight decay, layer-wise LR decay, per-unfreeze LR factors) and the LR schedule.

Every parameter group carries `lr_scale`; the schedule sets `lr = optim.lr * lr_scale * factor(step)` for every
group, including groups added later by gradual unfreezing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastft.config import OptimConfig

# Containers whose children are the real stages (regnet trunk, vit encoder layers, the `features` of
# vgg/efficientnet/mobilenet/convnext/swin/densenet).
_EXPAND = ("features", "trunk_output", "encoder", "layers")


def model_stages(model: nn.Module, head: str) -> list[list[str]]:
    """Parameter names grouped into stages in forward order, head excluded.

    Consecutive leaf modules (a stem's conv + bn) share a stage; a module with sub-modules is one stage; the
    containers named in _EXPAND are opened up."""
    out: list[list[str]] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            out.append(pending.copy())
            pending.clear()

    def in_head(n: str) -> bool:
        return n == head or n.startswith(head + ".")

    def visit(module: nn.Module, prefix: str) -> None:
        pending.extend(prefix + n for n, _ in module.named_parameters(recurse=False) if not in_head(prefix + n))
        for name, child in module.named_children():
            full = prefix + name
            names = [f"{full}.{n}" for n, _ in child.named_parameters() if not in_head(f"{full}.{n}")]
            if not names:
                continue  # parameter-free, or only the head
            if name in _EXPAND:
                flush()
                visit(child, full + ".")
                flush()
            elif not any(True for c in child.children() if any(True for _ in c.parameters())):
                pending.extend(names)  # a leaf such as conv/bn/ln joins its neighbours
            else:
                flush()
                out.append(names)

    visit(model, "")
    flush()
    return out


def layer_depths(model: nn.Module, head: str) -> dict[str, int]:
    """Depth of every parameter counted from the head: head 0, last stage 1, ..., stem len(stages)."""
    stages = model_stages(model, head)
    depths = {n: len(stages) - i for i, names in enumerate(stages) for n in names}
    for n, _ in model.named_parameters():
        depths.setdefault(n, 0)  # the head
    return depths


def param_groups(
    model: nn.Module, params: list[str], cfg: OptimConfig, *, head: str, lr_factor: float = 1.0, tag: str = ""
) -> list[dict[str, Any]]:
    """Groups for `params` (names): weight decay for weights only (not biases/norms), and lr_scale =
    lr_factor * layer_decay ** depth. Group order is deterministic (an exact resume rebuilds the same groups)."""
    named = dict(model.named_parameters())
    depths = layer_depths(model, head) if cfg.layer_decay != 1.0 else {}
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


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


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
