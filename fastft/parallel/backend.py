"""The Backend protocol: only what really differs between a single process, DDP and DeepSpeed."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class Backend(Protocol):
    name: str

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Wrap the trainable suffix (never the frozen prefix); returns the module to call in forward."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for accumulation micro-steps: skip gradient communication."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (the backend scales it for gradient accumulation)."""

    def step(self, boundary: bool) -> bool:
        """Called after every micro-batch. At an accumulation boundary: clip, step the optimizer (and scaler), zero
        grads. Returns False when a boundary step was skipped (fp16 overflow)."""

    # The dtype the wrapped module takes its inputs in, where it runs outside autocast (DeepSpeed's bf16/fp16 engine);
    # None: the prefix's output as it is.
    input_dtype: torch.dtype | None

    # Optimizer state: LocalBackend leaves it to the checkpoint file (optimizer.state_dict()); a backend that
    # partitions it (DeepSpeed ZeRO) sets owns_optimizer_state and writes/reads it itself, on every rank.
    owns_optimizer_state: bool

    def grads_finite(self) -> bool:
        """False once a step saw a non-finite gradient (checked by the loop before any checkpoint is written)."""

    def master_weights(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its full-precision value where the wrapped module holds a lower-precision copy (DeepSpeed
        bf16/fp16 keep fp32 masters in the optimizer); {} when the module's own parameters are the weights. A
        collective under sharded optimizers: every rank calls it."""

    def save_checkpoint(self, run_dir: Path, tag: str) -> None: ...

    def load_checkpoint(self, run_dir: Path, tag: str) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Small plain state (scaler, counters) stored in the checkpoint file."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LocalBackend:
    """Single process and DDP share this: DDP only adds the wrapper and no_sync."""

    def __init__(
        self,
        *,
        clip_grad_norm: float = 0.0,
        scaler: torch.amp.GradScaler | None = None,
        ddp: bool = False,
        device: torch.device | None = None,
        grad_accum: int = 1,
    ) -> None:
        self.name = "ddp" if ddp else "none"
        self.owns_optimizer_state = False
        self.input_dtype: torch.dtype | None = None  # autocast covers the module: inputs go in as they are
        self.grad_accum = grad_accum
        self.clip_grad_norm = clip_grad_norm
        self.scaler = scaler
        self.ddp = ddp
        self.device = device
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.skipped_steps = 0
        self.clip_sets: list[list[torch.nn.Parameter]] | None = None  # clip these sets separately (head sweep)
        self._bad: torch.Tensor | None = None

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.optimizer = optimizer
        if self.ddp and self.module is not None:
            # Re-wrapping after an unfreeze: free the old reducer (and its autograd hooks) before the new one.
            import gc

            self.module = None
            gc.collect()
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
            # The frozen prefix is outside this module, so every wrapped parameter that requires grad is used:
            # no find_unused_parameters scan is needed.
            module = DDP(module, device_ids=ids, broadcast_buffers=True)
        self.module = module
        return module

    def no_sync(self) -> contextlib.AbstractContextManager:
        if self.ddp and self.module is not None:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.grad_accum  # accumulated micro-batch gradients sum to the full batch's mean gradient
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, boundary: bool = True) -> bool:
        if not boundary:
            return True
        opt = self.optimizer
        assert opt is not None
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        if self.clip_grad_norm > 0:
            norms = [torch.nn.utils.clip_grad_norm_(group, self.clip_grad_norm) for group in self.clip_sets or [params]]
        elif self.scaler is None and grads:
            norms = [torch.nn.utils.get_total_norm(grads)]
        else:
            norms = []
        if self.scaler is None and norms:
            # Non-finite gradients with a finite loss: flagged on the device (no sync); the loop checks the flag
            # before any save, so a corrupted step never reaches a checkpoint. (fp16: the scaler skips such steps.)
            bad = ~torch.isfinite(torch.stack([n.float() for n in norms])).all()
            self._bad = bad if self._bad is None else (self._bad | bad)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(opt)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # the scale drops only when the step was skipped
            self.skipped_steps += not stepped
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return stepped

    def grads_finite(self) -> bool:
        """False once any step saw a non-finite gradient norm (one host sync)."""
        return self._bad is None or not bool(self._bad)

    def master_weights(self) -> dict[int, torch.Tensor]:
        return {}  # the module trains in its own (fp32) parameters; autocast only lowers the compute

    def save_checkpoint(self, run_dir: Path, tag: str) -> None:
        pass  # everything is in the checkpoint file

    def load_checkpoint(self, run_dir: Path, tag: str) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


# --------------------------------------------------------------------------------------------------------------------
# BatchNorm across ranks


def sync_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place; called before every evaluation and
    save, so the evaluated model is the saved one on every rank.

    Why they differ: DDP (broadcast_buffers=True) copies rank 0's buffers into every rank at the start of each
    training forward, and each rank's BatchNorm then updates them from its own batch during that forward; after the
    last step nothing copies them again. Rank 0's are taken (not an average) because they are what DDP itself trains
    with at every forward and what rank 0 writes. The parameters need no copy: DDP all-reduces the gradients, so every
    rank's optimizer makes the same update. (With SyncBatchNorm the statistics agree already; the copy is a no-op.)"""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def trainable_bn(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers in `module` that train (frozen ones never normalise with batch statistics)."""
    from fastft.model import is_frozen_bn

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
    import logging

    on, why = resolve_sync_bn(setting, suffix, world_size=world_size, device=device)
    if on:
        n = convert_sync_bn(suffix, model)
        logging.getLogger("fastft").info("fastft: SyncBatchNorm in the trainable part (%d layers): %s", n, why)
    elif setting == "on" or (setting == "auto" and world_size > 1 and trainable_bn(suffix)):
        logging.getLogger("fastft").info("fastft: parallel.sync_bn=%s: not converted: %s", setting, why)
    return on


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """True when every floating tensor of a state dict is finite (one host sync for the whole dict)."""
    flags = [torch.isfinite(t).all() for t in state.values() if t.is_floating_point()]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
