"""The Backend protocol: only what really differs between a single process, DDP and DeepSpeed; build_backend()."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fastft.errors import CheckpointError

log = logging.getLogger("fastft")


class Backend(Protocol):
    name: str
    # The dtype the wrapped module takes its inputs in, where it runs outside autocast (DeepSpeed's bf16/fp16 engine);
    # None: the prefix's output as it is.
    input_dtype: torch.dtype | None
    skipped_steps: int  # boundary steps skipped by fp16 loss scaling (overflow)

    def prepare(self, suffix: nn.Module, model: nn.Module) -> None:
        """Before compile, each time the suffix is (re)built: change its layers where the backend needs to (DDP:
        SyncBatchNorm)."""

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Wrap the trainable suffix (never the frozen prefix); returns the module to call in forward."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for accumulation micro-steps: skip gradient communication."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss (the backend scales it for gradient accumulation)."""

    def step(self, boundary: bool) -> bool:
        """Called after every micro-batch. At an accumulation boundary: clip, step the optimizer (and scaler), zero
        grads. Returns False when a boundary step was skipped (fp16 overflow)."""

    def grads_finite(self) -> bool:
        """False once a step saw a non-finite gradient (checked by the loop before any checkpoint is written)."""

    def master_weights(self) -> dict[int, torch.Tensor]:
        """id(parameter) -> its full-precision value where the wrapped module holds a lower-precision copy (DeepSpeed
        bf16/fp16 keep fp32 masters in the optimizer); {} when the module's own parameters are the weights. A
        collective under sharded optimizers: every rank calls it."""

    def save_optimizer_state(self, run_dir: Path, tag: str) -> dict[str, Any] | None:
        """The optimizer state for the checkpoint file `<run_dir>/<tag>.pt`, or None when the backend keeps it
        itself beside that file (DeepSpeed ZeRO partitions it: written on every rank, a collective)."""

    def load_optimizer_state(self, state: dict[str, Any] | None, path: Path) -> None:
        """Restore the optimizer state of checkpoint `path` (`state`: what save_optimizer_state returned for it)."""

    def state_dict(self) -> dict[str, Any]:
        """Small plain state (scaler, counters) stored in the checkpoint file."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_backend(
    name: str,
    *,
    env,
    precision,
    clip_grad_norm: float,
    grad_accum: int,
    clip_sets: list[list[nn.Parameter]] | None = None,
    sync_bn: str = "auto",
    deepspeed=None,
) -> Backend:
    """The backend for parallel.backend (auto | none | ddp | deepspeed) in this environment.

    Args:
        env: the distributed environment (fastft.parallel.env.DistEnv).
        precision: the resolved precision (an fp16 GradScaler comes from it).
        clip_sets: parameter sets clipped separately (a head sweep: heads must not influence each other).
        sync_bn: parallel.sync_bn, for DDP.
        deepspeed: the DeepSpeed options (fastft.parallel.deepspeed.DeepSpeedOptions) when name is "deepspeed".
    """
    if name == "auto":
        name = "ddp" if env.distributed else "none"
    if name == "deepspeed":
        from fastft.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(deepspeed, env, precision)
    common = {
        "clip_grad_norm": clip_grad_norm,
        "scaler": precision.make_scaler(),
        "device": env.device,
        "grad_accum": grad_accum,
        "clip_sets": clip_sets,
    }
    if name == "ddp" and env.distributed:
        from fastft.parallel.ddp import DDPBackend

        return DDPBackend(sync_bn=sync_bn, world_size=env.world_size, **common)
    if name == "ddp":
        log.info("fastft: parallel.backend=ddp with one process: running without DDP")
    return LocalBackend(**common)


class LocalBackend:
    """One process (DDPBackend adds the wrapper, no_sync and SyncBatchNorm)."""

    name = "none"

    def __init__(
        self,
        *,
        clip_grad_norm: float = 0.0,
        scaler: torch.amp.GradScaler | None = None,
        device: torch.device | None = None,
        grad_accum: int = 1,
        clip_sets: list[list[nn.Parameter]] | None = None,
    ) -> None:
        self.input_dtype: torch.dtype | None = None  # autocast covers the module: inputs go in as they are
        self.grad_accum = grad_accum
        self.clip_grad_norm = clip_grad_norm
        self.scaler = scaler
        self.device = device
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.skipped_steps = 0
        self.clip_sets = clip_sets  # clip these sets separately (head sweep)
        self._bad: torch.Tensor | None = None

    def prepare(self, suffix: nn.Module, model: nn.Module) -> None:
        pass

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        self.optimizer = optimizer
        self.module = module
        return module

    def no_sync(self) -> contextlib.AbstractContextManager:
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
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        norms = []
        if self.clip_grad_norm > 0:
            params = [p for g in opt.param_groups for p in g["params"]]
            norms = [torch.nn.utils.clip_grad_norm_(group, self.clip_grad_norm) for group in self.clip_sets or [params]]
        if self.scaler is None and norms:
            # Non-finite gradients with a finite loss: flagged on the device (no sync) from the clip norm, computed
            # anyway; the loop checks the flag before any save. Without clipping no extra pass over the gradients is
            # made: a non-finite gradient makes its weights non-finite at this step (SGD and AdamW alike), and every
            # save refuses non-finite weights and optimizer state. (fp16: the scaler skips such steps.)
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
        """False once a clipped step saw a non-finite gradient norm (one host sync); without clipping always True (the
        weights carry a bad gradient: see step)."""
        return self._bad is None or not bool(self._bad)

    def master_weights(self) -> dict[int, torch.Tensor]:
        return {}  # the module trains in its own (fp32) parameters; autocast only lowers the compute

    def save_optimizer_state(self, run_dir: Path, tag: str) -> dict[str, Any] | None:
        assert self.optimizer is not None
        return self.optimizer.state_dict()  # everything is in the checkpoint file

    def load_optimizer_state(self, state: dict[str, Any] | None, path: Path) -> None:
        from fastft import resume as resume_rules

        if state is None:
            raise CheckpointError(
                f"{path}: saved by the DeepSpeed backend; resume it with --parallel.backend=deepspeed"
            )
        resume_rules.load_optimizer_state(self.optimizer, state)  # this run's LR, momentum, decay

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
# Buffers and weights across ranks


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


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """True when every floating tensor of a state dict is finite (one host sync for the whole dict).

    Per device and dtype, as clip_grad_norm_ groups them. On accelerators: each tensor's largest magnitude (a fused
    max-norm), infinite or NaN exactly when one of its elements is; no tensor-sized mask is made, unlike
    isfinite(t).all(). On the CPU, where that max-norm is single-threaded (0.1 s for 283 MB on 2 cores): each tensor's
    sum, which is infinite or NaN whenever an element is (IEEE addition never turns inf or NaN finite) and 10x faster;
    a sum that overflows from finite elements alone is then told apart by the exact max-norm, so no state is refused
    for it."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in state.values():
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = []
    for (device, _), ts in groups.items():
        if device.type == "cpu" and bool(torch.isfinite(torch.stack([t.sum() for t in ts])).all()):
            continue  # every sum finite: every element is
        flags.append(torch.isfinite(torch.stack(torch._foreach_norm(ts, math.inf))).all().cpu())
    return not flags or bool(torch.stack(flags).all())
