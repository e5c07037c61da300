"""torch.compile for the trainable part, with static shapes (ragged batches are dropped or padded by the caller)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastft.config import CompileConfig

log = logging.getLogger("fastft")


def resolve_target(cfg: CompileConfig, device: torch.device) -> str:
    """`auto` compiles the trainable part on CUDA only: on CPU the compile time outweighs the gain for a small head."""
    if cfg.target != "auto":
        return cfg.target
    return "head" if device.type == "cuda" else "none"


def apply_compile(module: nn.Module, cfg: CompileConfig) -> nn.Module:
    """Compile `module` with fixed shapes.

    dynamic=False: training drops the ragged last batch and evaluation pads it to the full batch size, so one
    graph serves every step and no recompile happens mid-epoch."""
    return torch.compile(module, mode=None if cfg.mode == "default" else cfg.mode, backend=cfg.backend, dynamic=False)
