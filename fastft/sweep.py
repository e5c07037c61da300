"""Many heads per backbone pass: H heads with their own LR / weight decay trained side by side on the same features.

One batched module computes every head's logits from one feature tensor (a single einsum for linear heads), so the
backbone (or the feature cache) is read once per step for all H heads. The loss is the sum of the heads' losses, so
each head receives exactly its own gradient, and each head has its own optimizer groups: head h trains as it would
alone with the same seed (without head dropout, whose random draws would be shared)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from fastft.config import FinetuneConfig, OptimConfig
from fastft.errors import ConfigError


def sweep_grid(cfg: FinetuneConfig) -> list[tuple[float, float]]:
    """(lr, weight_decay) per head: the grid of head.sweep_lr x head.sweep_weight_decay; [] when not sweeping."""
    lrs, wds = cfg.head.sweep_lr, cfg.head.sweep_weight_decay
    if not lrs and not wds:
        return []
    return list(itertools.product(lrs or [cfg.optim.lr], wds or [cfg.optim.weight_decay]))


class HeadBank(nn.Module):
    """H copies of a head (same initial weights); forward returns (H, B, classes)."""

    def __init__(self, head: nn.Module, count: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(copy.deepcopy(head) for _ in range(count))
        self.linear = isinstance(head, nn.Linear) and head.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            w = torch.stack([h.weight for h in self.heads])  # (H, C, D)
            b = torch.stack([h.bias for h in self.heads])  # (H, C)
            return torch.einsum("bd,hcd->hbc", x.flatten(1), w) + b[:, None, :]
        return torch.stack([h(x) for h in self.heads])


def bank_param_groups(bank: HeadBank, grid: list[tuple[float, float]], cfg: OptimConfig) -> list[dict[str, Any]]:
    """Per head: weights with that head's weight decay, biases without; lr_scale makes lr = that head's LR."""
    groups = []
    for i, (head, (lr, wd)) in enumerate(zip(bank.heads, grid)):
        decay = [p for p in head.parameters() if p.ndim > 1]
        no_decay = [p for p in head.parameters() if p.ndim <= 1]
        for ps, w, tag in ((decay, wd, ""), (no_decay, 0.0, "-nd")):
            if ps:
                groups.append({"params": ps, "weight_decay": w, "lr_scale": lr / cfg.lr, "name": f"head{i}{tag}"})
    return groups


def check_sweep(cfg: FinetuneConfig, split_kind: str) -> None:
    if split_kind != "head":
        raise ConfigError('head.sweep_lr: a head sweep needs a linear probe (model.freeze = "backbone")')
    if cfg.optim.unfreeze:
        raise ConfigError("head.sweep_lr: cannot be combined with optim.unfreeze")
    if cfg.parallel.backend == "deepspeed":
        raise ConfigError("head.sweep_lr: not supported with parallel.backend=deepspeed (use ddp)")


def sweep_table(grid: list[tuple[float, float]], reports: list[dict], metric: str, best: int) -> str:
    lines = [f"  {'head':>4} {'lr':>10} {'wd':>8} {'top1':>8} {metric:>12} {'loss':>8}"]
    for i, ((lr, wd), r) in enumerate(zip(grid, reports)):
        mark = "  <- kept" if i == best else ""
        lines.append(f"  {i:>4} {lr:>10.3g} {wd:>8.3g} {r['top1']:>8.4f} {r[metric]:>12.4f} {r['loss']:>8.4f}{mark}")
    return "\n".join(lines)
