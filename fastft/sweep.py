"""Many heads per backbone pass: H heads with their own LR / weight decay trained side by side on the same features.

One batched module computes every head's logits from one feature tensor (a single einsum for linear heads), so the
backbone (or the feature cache) is read once per step for all H heads. The loss is the sum of the heads' losses, so
each head receives exactly its own gradient, and each head has its own optimizer groups: head h trains as it would
alone with the same seed. A head that is dropout then a linear layer (a text classifier's; an image head with
model.head_dropout) draws one dropout mask per step, shared by every head: the mask a lone run draws at that step."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import nn

from fastft.checkpoint import load_model_state
from fastft.config import FinetuneConfig, OptimConfig
from fastft.errors import ConfigError
from fastft.losses import Loss


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
        self.dropout = _is_dropout_linear(head)  # heads[i] = Sequential(Dropout, Linear): one mask for all heads
        self.linear = (isinstance(head, nn.Linear) and head.bias is not None) or self.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear:
            if self.dropout:
                x = self.heads[0][0](x)  # one draw, as a lone head's dropout makes at this step
            layers = [h[1] for h in self.heads] if self.dropout else self.heads
            w = torch.stack([h.weight for h in layers])  # (H, C, D)
            b = torch.stack([h.bias for h in layers])  # (H, C)
            return torch.einsum("bd,hcd->hbc", x.flatten(1), w) + b[:, None, :]
        return torch.stack([h(x) for h in self.heads])


def _is_dropout_linear(head: nn.Module) -> bool:
    return (
        isinstance(head, nn.Sequential)
        and len(head) == 2
        and isinstance(head[0], nn.Dropout)
        and isinstance(head[1], nn.Linear)
        and head[1].bias is not None
    )


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


class Sweep:
    """A head sweep: its heads (one bank on the features), their optimizer groups and clip sets, the summed loss, and
    the choice of the best head, which becomes the run's head (so every checkpoint and export is a plain model).

    Args:
        cfg: the run's config (head.sweep_*, optim, checkpoint.best_metric / best_mode are read).
        split: the model's split; its suffix (the head) is copied into the bank.
    """

    def __init__(self, cfg: FinetuneConfig, split, device: torch.device) -> None:
        from fastft.backbones.split import Split

        self.grid = sweep_grid(cfg)  # [(lr, wd)] per head
        check_sweep(cfg, split.kind)
        self.model = split.model
        self.head = split.suffix  # a probe: the suffix is the model's head module
        self.bank = HeadBank(split.suffix, len(self.grid)).to(device)
        self.split = Split(split.model, split.prefix, self.bank, "head")  # the suffix becomes the bank
        self.metric, self.mode = cfg.checkpoint.best_metric, cfg.checkpoint.best_mode

    @classmethod
    def from_config(cls, cfg: FinetuneConfig, split, device: torch.device) -> Sweep | None:
        """The sweep the config asks for, or None (head.sweep_lr and head.sweep_weight_decay empty)."""
        return cls(cfg, split, device) if sweep_grid(cfg) else None

    @property
    def heads(self) -> int:
        return len(self.grid)

    def param_groups(self, cfg: OptimConfig) -> list[dict[str, Any]]:
        return bank_param_groups(self.bank, self.grid, cfg)

    def clip_sets(self) -> list[list[nn.Parameter]]:
        """Each head clipped on its own: heads must not influence each other."""
        return [list(h.parameters()) for h in self.bank.heads]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss: Loss) -> torch.Tensor:
        """Sum of the heads' mean losses (`loss`, the run's): each head gets exactly its own gradient."""
        per = loss.per_sample(logits.flatten(0, 1), labels.repeat(self.heads, *[1] * (labels.ndim - 1)))
        return per.view(self.heads, -1).mean(dim=1).sum()

    def select(self, reports: list[dict]) -> dict:
        """Keep the best head as the model's head; the report of that head, with the sweep's table."""
        key, sign = self.metric, 1 if self.mode == "max" else -1
        best_i = max(range(len(reports)), key=lambda i: sign * reports[i][key])
        self.head.load_state_dict(self.bank.heads[best_i].state_dict())
        report = dict(reports[best_i])
        report["sweep"] = [
            {"head": i, "lr": lr, "weight_decay": wd, "top1": r["top1"], key: r[key], "loss": r["loss"]}
            for i, ((lr, wd), r) in enumerate(zip(self.grid, reports))
        ]
        report["sweep_best"] = best_i
        report["sweep_table"] = sweep_table(self.grid, reports, key, best_i)
        return report

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], path) -> None:
        load_model_state(self.bank, state, path)
