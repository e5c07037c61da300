"""DDP: the trainable suffix (never the frozen prefix) in DistributedDataParallel, optional SyncBatchNorm."""

from __future__ import annotations

import contextlib
import gc
import logging

import torch
from torch import nn

from fastft.parallel.backend import LocalBackend

log = logging.getLogger("fastft")


class DDPBackend(LocalBackend):
    """LocalBackend's step, clipping and scaler, with DDP's wrapper, no_sync and SyncBatchNorm."""

    name = "ddp"

    def __init__(self, *, sync_bn: str = "auto", world_size: int = 2, **local) -> None:
        super().__init__(**local)
        self.sync_bn = sync_bn
        self.world_size = world_size

    def prepare(self, suffix: nn.Module, model: nn.Module) -> None:
        # Before compile: the compiled graph must see the SyncBatchNorm layers.
        apply_sync_bn(self.sync_bn, suffix, model, world_size=self.world_size, device=self.device)

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.optimizer = optimizer
        if self.module is not None:
            # Re-wrapping after an unfreeze: free the old reducer (and its autograd hooks) before the new one.
            self.module = None
            gc.collect()
        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        # The frozen prefix is outside this module, so every wrapped parameter that requires grad is used:
        # no find_unused_parameters scan is needed.
        self.module = DDP(module, device_ids=ids, broadcast_buffers=True)
        return self.module

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.module.no_sync() if self.module is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------------
# SyncBatchNorm


def trainable_bn(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers in `module` that train (frozen ones never normalise with batch statistics)."""
    from fastft.backbones.freeze import is_frozen_bn

    return [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not isinstance(m, nn.SyncBatchNorm)
        and not is_frozen_bn(m)
        and any(p.requires_grad for p in m.parameters())
    ]


def resolve_sync_bn(setting: str, suffix: nn.Module, *, world_size: int, device: torch.device) -> tuple[bool, str]:
    """parallel.sync_bn (auto | on | off) -> (convert the suffix's BatchNorm to SyncBatchNorm?, why).

    torch's SyncBatchNorm raises on CPU tensors when it has to synchronise (it needs a GPU), so on CPU with several
    ranks each rank normalises with its own batch's statistics and only the buffers are made equal (sync_buffers)."""
    if setting == "off":
        return False, "parallel.sync_bn=off"
    if world_size <= 1:
        return False, "one process"
    if not trainable_bn(suffix):
        return False, "no trainable BatchNorm"
    if device.type != "cuda":
        return False, (
            f"SyncBatchNorm needs a GPU (torch refuses {device.type} tensors): each rank normalises with its own "
            "batch's statistics; rank 0's running statistics are copied to every rank before evaluation and saves"
        )
    return True, f"parallel.sync_bn={setting}: BatchNorm statistics over the global batch"


def convert_sync_bn(suffix: nn.Module, *also: nn.Module) -> int:
    """Replace the suffix's trainable BatchNorm layers by SyncBatchNorm (sharing their parameters and buffers), in
    the suffix and wherever else they are registered (`also`: the full model, which the suffix may only reference).
    Frozen BatchNorm stays as it is. Returns how many layers were converted."""
    new = {id(m): nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in trainable_bn(suffix)}
    for root in (suffix, *also):
        for parent in root.modules():
            for name, child in list(parent.named_children()):
                if id(child) in new:
                    setattr(parent, name, new[id(child)])
    return len(new)


def apply_sync_bn(setting: str, suffix: nn.Module, model: nn.Module, *, world_size: int, device: torch.device) -> bool:
    """Resolve parallel.sync_bn for this suffix, convert when on, and log the decision. Returns whether it is on."""
    on, why = resolve_sync_bn(setting, suffix, world_size=world_size, device=device)
    if on:
        n = convert_sync_bn(suffix, model)
        log.info("fastft: SyncBatchNorm in the trainable part (%d layers): %s", n, why)
    elif setting == "on" or (setting == "auto" and world_size > 1 and trainable_bn(suffix)):
        log.info("fastft: parallel.sync_bn=%s: not converted: %s", setting, why)
    return on
