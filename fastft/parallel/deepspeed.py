"""DeepSpeed backend: the trainable suffix inside a DeepSpeed engine, its config generated from fastft's config.

fastft keeps what it owns: the optimizer (built over the trainable parameters only), the LR schedule (set by
the trainer once per optimizer step, in the same param_group dicts DeepSpeed's wrapped optimizer reads), the data
loaders, autocast and the checkpoint file. DeepSpeed owns gradient reduction, ZeRO partitioning of optimizer state
(stage 1) and gradients (stage 2), fp16 loss scaling, clipping, and the optimizer-state part of a checkpoint.

ZeRO stage 3 is refused: it partitions the parameters themselves, but only the suffix trains and the trainer reads
and exports the whole model as a plain state dict on rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastft.errors import CheckpointError, ConfigError, FastftError
from fastft.parallel.env import DistEnv
from fastft.precision import Precision

# Keys fastft derives from its own config: a user JSON may repeat them with the same value (or "auto"), never another.
_DERIVED_KEYS = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "train_batch_size": "data.batch_size x optim.grad_accum x world size",
    "gradient_clipping": "optim.clip_grad_norm",
}
# fastft passes its optimizer and steps its own schedule; a DeepSpeed section would silently replace them.
_OWNED_SECTIONS = {"optimizer": "[optim]", "scheduler": "optim.schedule and optim.warmup_steps"}
_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"parallel.backend=deepspeed needs DeepSpeed: pip install 'fastft[deepspeed]' ({e})") from e
    return deepspeed


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested dicts are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_user_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_config: no such file {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config: {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: {p} must hold a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class DeepSpeedOptions:
    """What the DeepSpeed backend reads from fastft's config."""

    micro_batch: int  # data.batch_size
    grad_accum: int  # optim.grad_accum
    clip_grad_norm: float  # optim.clip_grad_norm
    zero_stage: int  # parallel.zero_stage
    user_config: str = ""  # parallel.deepspeed_config: a JSON file merged over the generated config
    timeout_s: float = 1800.0  # parallel.timeout_s

    @classmethod
    def from_config(cls, cfg) -> DeepSpeedOptions:
        """From a FinetuneConfig."""
        return cls(
            micro_batch=cfg.data.batch_size,
            grad_accum=cfg.optim.grad_accum,
            clip_grad_norm=float(cfg.optim.clip_grad_norm),
            zero_stage=cfg.parallel.zero_stage,
            user_config=cfg.parallel.deepspeed_config or "",
            timeout_s=cfg.parallel.timeout_s,
        )


def build_config(opts: DeepSpeedOptions, env: DistEnv, precision: Precision) -> dict[str, Any]:
    """The DeepSpeed config of a run: generated from fastft's config, then the user's JSON merged over it.

    Args:
        opts: the DeepSpeed options (batch size, accumulation, clipping, ZeRO stage, user JSON).
        env: the distributed environment (its world size fixes train_batch_size).
        precision: the resolved precision; it selects DeepSpeed's bf16 or fp16 section.
    Returns:
        A plain dict for ``deepspeed.initialize(config=...)``.
    Raises:
        ConfigError: ZeRO stage 3; a missing or invalid user JSON; a user key that contradicts the batch size,
            accumulation, clipping, precision, optimizer or schedule fastft configures (naming key and file).
    """
    ds = _generated_config(opts, env, precision)
    if opts.user_config:
        ds = _merge_user_config(ds, opts.user_config, precision)
    _check_stage(ds, opts, precision)
    return ds


def _generated_config(opts: DeepSpeedOptions, env: DistEnv, precision: Precision) -> dict[str, Any]:
    micro, accum = opts.micro_batch, opts.grad_accum
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * env.world_size,
        # Written even when off: DeepSpeed's default is 1.0, which would silently clip every run.
        "gradient_clipping": float(opts.clip_grad_norm),
        "zero_optimization": {"stage": opts.zero_stage},
        # fastft passes its own torch SGD / AdamW; DeepSpeed calls optimizers outside its Adam family "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # fastft logs; DeepSpeed's progress lines would interleave with them
        "wall_clock_breakdown": False,
    }
    if precision.dtype in (torch.bfloat16, torch.float16):
        # DeepSpeed casts the module's parameters to the low dtype and (0.19.8 at least) leaves its buffers in fp32;
        # torch's batch norm refuses bf16/fp16 weights with fp32 running statistics, so a trainable BatchNorm (a
        # partial or full fine-tune of a CNN) would fail. Buffers follow the parameters, as in DeepSpeed's older
        # whole-module cast.
        ds["data_types"] = {"buffer_dtype": precision.name}
    if precision.dtype == torch.bfloat16:
        ds["bf16"] = {"enabled": True}
    elif precision.dtype == torch.float16:
        # loss_scale 0 = dynamic loss scaling, as torch's GradScaler: start at 2**16, halve on overflow, skip the step.
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


def _merge_user_config(ds: dict[str, Any], source: str, precision: Precision) -> dict[str, Any]:
    """The user's JSON merged over the generated config; keys fastft derives or owns may not contradict it."""
    user = _read_user_config(source)
    for key, fastft_key in _DERIVED_KEYS.items():
        if user.get(key) == "auto":
            del user[key]  # the HF-style placeholder: fastft fills it in
        elif key in user and user[key] != ds[key]:
            raise ConfigError(
                f"parallel.deepspeed_config: {key} is {user[key]!r} in {source} but fastft's config "
                f"gives {ds[key]} ({fastft_key}); remove it from the JSON or change {fastft_key}"
            )
    for key, fastft_key in _OWNED_SECTIONS.items():
        if key in user:
            raise ConfigError(
                f"parallel.deepspeed_config: {source} has a {key!r} section, but fastft sets the "
                f"{key} ({fastft_key}); remove it from the JSON"
            )
    ds = _deep_merge(ds, user)
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = ds.get(key)
        enabled = isinstance(section, dict) and bool(section.get("enabled", False))
        if enabled != (precision.dtype == dtype):
            raise ConfigError(
                f"parallel.deepspeed_config: {key}.enabled={enabled} in {source} contradicts "
                f"precision.dtype={precision.name} (resolved); choose the precision with "
                f"precision.dtype, autocast follows it"
            )
    return ds


def _check_stage(ds: dict[str, Any], opts: DeepSpeedOptions, precision: Precision) -> None:
    source = opts.user_config
    stage = ds["zero_optimization"].get("stage", 0) if isinstance(ds.get("zero_optimization"), dict) else 0
    where = "parallel.zero_stage" if stage == opts.zero_stage else f"zero_optimization.stage in {source}"
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"{where}: ZeRO stage {stage} is not supported, use 0, 1 or 2 (stage 3 partitions the "
            f"parameters; fastft trains only the suffix and exports whole weights)"
        )
    if stage == 0 and precision.dtype == torch.float16:
        # DeepSpeed 0.19.8's engine.backward() applies the fp16 loss scale only for ZeRO optimizers, while its ZeRO 0
        # fp16 optimizers still divide the gradients by it: every update would be 65536 times too small.
        raise ConfigError(
            f"{where}: fp16 with ZeRO stage 0 does not train under DeepSpeed (the loss scale is divided out of "
            f"gradients it was never applied to); use ZeRO stage 1 or 2, or precision.dtype=bf16"
        )


class DeepSpeedBackend:
    """The Backend protocol (fastft.parallel.backend.Backend) on a DeepSpeed engine."""

    name = "deepspeed"

    def __init__(self, opts: DeepSpeedOptions, env: DistEnv, precision: Precision) -> None:
        self.env = env
        self.timeout_s = opts.timeout_s
        self.config = build_config(opts, env, precision)  # config errors surface before any process group work
        self.engine = None
        self.skipped_steps = 0
        # The dtype the engine's module computes in: DeepSpeed's bf16/fp16 sections cast it to that dtype and run its
        # forward with autocast switched off, so what enters it (prefix output, cached features, images) must match.
        self.input_dtype: torch.dtype | None = next(
            (dtype for key, dtype in _LOW_PRECISION.items() if self.config.get(key, {}).get("enabled")), None
        )
        self._saved: dict[str, str] = {}  # fastft tag ("last", "best") -> DeepSpeed tag its checkpoint file names
        self._last_tag: str | None = None  # the DeepSpeed tag of the checkpoint file being written right now
        self._bad = False  # a boundary step saw non-finite gradients (fp32/bf16)
        self._own_bad: torch.Tensor | None = None  # the same, from a gradient norm still on the device

    # -- wrap ---------------------------------------------------------------------------------------------------------

    def _ensure_process_group(self) -> None:
        """DeepSpeed always needs a process group: adopt the existing one, or create a one-rank group."""
        os.environ.setdefault("LOCAL_RANK", str(self.env.local_rank))  # DeepSpeed asserts that it is set
        if dist.is_initialized():
            return  # fastft's (torchrun / deepspeed launcher) or an embedding job's: DeepSpeed adopts it
        backend = "nccl" if self.env.device.type == "cuda" else "gloo"
        # An in-memory store: one process needs no MASTER_ADDR or port. fastft created it, so penv.shutdown ends it.
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=self.timeout_s)
        )
        self.env.owns_group = True

    def prepare(self, suffix: nn.Module, model: nn.Module) -> None:
        pass

    def wrap(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        deepspeed = _import_deepspeed()
        self._ensure_process_group()
        _forget_dead_deepspeed_groups()
        _check_dtype_supported(self.input_dtype)
        _contiguous_parameters(module)
        params = [p for p in module.parameters() if p.requires_grad]  # the optimizer holds exactly these
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=params, config=self.config
        )
        # The trainer's schedule (fastft.optim.Schedule) writes "lr" into optimizer.param_groups. DeepSpeed's wrappers
        # (ZeRO 1/2, bf16, fp16) keep that torch optimizer and its group dicts, swapping only their "params" for fp32
        # (partition) copies, and step it: the schedule reaches the update. Copied groups would break this silently.
        groups = getattr(ds_optimizer, "param_groups", None)
        if (
            groups is None
            or len(groups) != len(optimizer.param_groups)
            or any(a is not b for a, b in zip(groups, optimizer.param_groups))
        ):
            raise FastftError(
                f"DeepSpeed {deepspeed.__version__} ({type(ds_optimizer).__name__}) copied the "
                f"optimizer's param groups: fastft's LR schedule would not reach the update"
            )
        _load_checkpoints_without_code(engine)
        self.engine = engine
        return engine

    # -- one micro-batch ----------------------------------------------------------------------------------------------

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces gradients at its own accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps (and applies the fp16 loss scale)

    def step(self, boundary: bool) -> bool:
        engine = self.engine
        ds_boundary = engine.is_gradient_accumulation_boundary()  # ask before step(): it advances the micro-step
        if ds_boundary != boundary:
            raise RuntimeError(
                f"DeepSpeed's accumulation boundary ({ds_boundary}) disagrees with fastft's "
                f"({boundary}) at micro-step {engine.micro_steps}"
            )
        # ZeRO 0 in fp32 steps the torch optimizer on the module's own gradients and checks nothing: norm them here.
        if boundary and not hasattr(engine.optimizer, "overflow"):
            own = _grad_norm(engine.module)  # kept on the device: no host sync per step
            if own is not None:
                bad = ~torch.isfinite(own)
                self._own_bad = bad if self._own_bad is None else (self._own_bad | bad)
        engine.step()  # between boundaries it only counts the micro-step
        if not boundary:
            return True
        applied = engine.was_step_applied()  # False when DeepSpeed found non-finite gradients and skipped the update
        if self.input_dtype == torch.float16:
            self.skipped_steps += not applied  # fp16: an overflow of the loss scale, lowered for the next step
        elif not applied:
            self._bad = True  # bf16 / fp32 (ZeRO 1/2, the bf16 optimizer): no loss scale, so the gradients were bad
        # ZeRO 1/2 and the bf16 optimizer: inf when not finite (also where a JSON switched their overflow check off)
        norm = engine.get_global_grad_norm()
        if norm is not None and self.input_dtype != torch.float16:
            if isinstance(norm, torch.Tensor):  # kept on the device: no host sync per step
                bad = ~torch.isfinite(norm)
                self._own_bad = bad if self._own_bad is None else (self._own_bad | bad.to(self._own_bad.device))
            elif not math.isfinite(norm):
                self._bad = True
        return applied

    # -- checkpoints --------------------------------------------------------------------------------------------------
    # The optimizer state (ZeRO: one file per rank) goes to run_dir/deepspeed/<tag>-step<N>/, a new folder per step;
    # the checkpoint file the Checkpointer writes right after records that folder (state_dict()["deepspeed_tag"]). A run
    # killed between the two writes resumes from a consistent pair: the folder the old file names is kept until the
    # next save, when that file has been replaced.

    def grads_finite(self) -> bool:
        """False once a boundary step saw non-finite gradients outside fp16 loss scaling (whose overflows are skipped
        steps, counted in skipped_steps, as with torch's GradScaler)."""
        return not self._bad and (self._own_bad is None or not bool(self._own_bad))

    def master_weights(self) -> dict[int, torch.Tensor]:
        """The fp32 masters of the trainable parameters when DeepSpeed trains a bf16/fp16 copy of the module (so
        saves and exports hold the weights training converged to, not their rounding). Under ZeRO 1/2 each master is
        assembled from the ranks' partitions: a collective. ZeRO 0 keeps whole masters in its optimizer wrapper."""
        if self.engine is None or not any(self.config.get(k, {}).get("enabled") for k in ("bf16", "fp16")):
            return {}
        from deepspeed.utils import safe_get_full_fp32_param

        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        out = {}
        for p in params:
            master = safe_get_full_fp32_param(p)  # ZeRO 1/2 and the bf16 optimizer map each parameter
            if master is not None:
                out[id(p)] = master.detach().to("cpu", copy=True)
        if len(out) < len(params):  # ZeRO 0's FP16 optimizers pair their groups instead
            out.update(_group_masters(self.engine.optimizer))
        missing = [p for p in params if id(p) not in out]
        if missing:
            raise FastftError(
                f"DeepSpeed {type(self.engine.optimizer).__name__}: no fp32 master found for {len(missing)} of "
                f"{len(params)} trainable tensors; saving the low-precision copy would lose precision"
            )
        return out

    def save_checkpoint(self, run_dir: Path, tag: str) -> None:
        ds_tag = f"{tag}-step{self.engine.global_steps}"
        self._last_tag = ds_tag
        if self._saved.get(tag) == ds_tag:
            return  # the same step again (every_steps, then the epoch end): identical state, already on disk
        save_dir = Path(run_dir) / "deepspeed"
        # The folder the current <tag>.pt names (this process saved or loaded it, or a resumed run's file says so).
        previous = self._saved.get(tag) or _backend_state(Path(run_dir) / f"{tag}.pt").get("deepspeed_tag")
        self.engine.save_checkpoint(str(save_dir), tag=ds_tag, client_state={"fastft_tag": tag}, save_latest=False)
        self._saved[tag] = ds_tag
        if self.env.local_rank == 0:  # one process per node: the folder may be node-local
            pattern = re.compile(rf"{re.escape(tag)}-step\d+")
            for old in save_dir.iterdir():
                if old.is_dir() and pattern.fullmatch(old.name) and old.name not in (ds_tag, previous):
                    shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, run_dir: Path, tag: str) -> None:
        path = Path(run_dir) / f"{tag}.pt"
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        state = _backend_state(path)
        ds_tag = state.get("deepspeed_tag")
        if not ds_tag:
            raise CheckpointError(
                f"{path} holds no DeepSpeed state (it was saved with another parallel.backend); "
                f"resume it with that backend"
            )
        stage = self.config["zero_optimization"]["stage"]
        saved = (state.get("world_size"), state.get("zero_stage"))
        if (stage or saved[1]) and saved != (self.env.world_size, stage):
            raise CheckpointError(
                f"{path}: saved by {saved[0]} processes with ZeRO stage {saved[1]}, resumed by "
                f"{self.env.world_size} with stage {stage}; partitioned optimizer state only loads "
                f"with the same world size and stage"
            )
        load_dir = Path(run_dir) / "deepspeed"
        if not (load_dir / ds_tag).is_dir():
            raise CheckpointError(f"{path} needs the DeepSpeed state {load_dir / ds_tag}, which is missing")
        # Module, optimizer state and fp32 master weights; the LR schedule is fastft's and comes from the file.
        loaded, _ = self.engine.load_checkpoint(
            str(load_dir),
            tag=ds_tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {load_dir / ds_tag}")
        self._saved[tag] = self._last_tag = ds_tag

    def save_optimizer_state(self, run_dir: Path, tag: str) -> dict[str, Any] | None:
        self.save_checkpoint(run_dir, tag)  # ZeRO: one file per rank, beside the checkpoint file
        return None

    def load_optimizer_state(self, state: dict[str, Any] | None, path: Path) -> None:
        self.load_checkpoint(path.parent, path.stem)

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "deepspeed_tag": self._last_tag,
            "world_size": self.env.world_size,
            "zero_stage": self.config["zero_optimization"]["stage"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _grad_norm(module: nn.Module) -> torch.Tensor | None:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _check_dtype_supported(dtype: torch.dtype | None) -> None:
    """DeepSpeed refuses fp16 where its accelerator has no fp16 kernels (CPUs without AVX512-FP16/AMX-FP16) with a
    bare ValueError deep in initialize: say it in fastft's terms first."""
    if dtype != torch.float16:
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        raise ConfigError(
            f"precision.dtype: DeepSpeed has no fp16 support on this {accelerator.device_name()} device; "
            f"use bf16 or fp32"
        )


def _contiguous_parameters(module: nn.Module) -> None:
    """Give every parameter of the module DeepSpeed wraps the plain contiguous layout.

    DeepSpeed broadcasts each parameter as ``p.data.view(torch.uint8)`` and ZeRO 1/2 (and its bf16/fp16 optimizers)
    flatten the parameters into one buffer and make them views of it; a channels_last conv weight fails the first
    and cannot survive the second. channels_last still applies where it pays, to the activations: a convolution
    with a channels_last input computes in channels_last whatever its weight's layout. The parameter objects stay the
    same (only their storage changes), so the optimizer and the canonical model keep pointing at them."""
    for p in module.parameters():
        # Compared with the row-major strides, not is_contiguous(): that ignores size-1 dimensions, so a channels_last
        # 1x1 conv weight passes it with stride(-1) = in_channels, and DeepSpeed's view(uint8) still fails.
        if p.stride() != _row_major_strides(p.shape):
            p.data = p.data.clone(memory_format=torch.contiguous_format)


def _row_major_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _group_masters(optimizer) -> dict[int, torch.Tensor]:
    """id(low-precision parameter) -> fp32 master in DeepSpeed's ZeRO 0 FP16 optimizers (also used for bf16):
    the unfused one keeps per-parameter masters (fp32_groups), the fused one a flat buffer per group."""
    from torch._utils import _unflatten_dense_tensors

    low = getattr(optimizer, "fp16_groups", None)
    if low is None:
        return {}
    if hasattr(optimizer, "fp32_groups_flat"):
        high = [_unflatten_dense_tensors(flat, group) for flat, group in zip(optimizer.fp32_groups_flat, low)]
    else:
        high = getattr(optimizer, "fp32_groups", [])
    return {
        id(p): m.detach().to("cpu", copy=True)
        for group, masters in zip(low, high)
        for p, m in zip(group, masters)
        if m.shape == p.shape
    }


def _backend_state(path: Path) -> dict[str, Any]:
    """The backend entry of a fastft checkpoint file ({} when there is no file); mmap reads no model tensors."""
    if not path.is_file():
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("backend") or {}
    except Exception as e:  # the trainer read this file a moment ago: name it if it fails now
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _forget_dead_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (deepspeed.utils.groups). After an earlier run in this
    process destroyed its group (fastft does at the end of finetune), those handles are dead and the next
    deepspeed.initialize fails with "Group ... is not registered": drop them so DeepSpeed derives new ones."""
    from deepspeed.utils import groups

    def dead(group) -> bool:
        if group is None:
            return False
        try:
            dist.get_process_group_ranks(group)
        except (KeyError, ValueError, RuntimeError):
            return True
        return False

    names = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None and any(dead(getattr(groups, n, None)) for n in names):
        release(None)


def _load_checkpoints_without_code(engine) -> None:
    """DeepSpeed's TorchCheckpointEngine unpickles whole files (weights_only off), which runs code a file carries.
    fastft loads nothing that way: read with weights_only=True, allowing only the plain DeepSpeed classes its
    checkpoints hold (loss scaler, ZeRO stage enum, fragment address)."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if type(ckpt_engine).__name__ != "TorchCheckpointEngine":
        return  # another engine chosen in the user's JSON (Nebula, decoupled, ...) keeps its own loading
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                found = re.search(r"GLOBAL [\w.]+", str(e))
                raise CheckpointError(
                    f"cannot load DeepSpeed state {path}: it holds objects that could run code "
                    f"({found.group(0) if found else 'not tensors and plain containers'})"
                ) from None

    ckpt_engine.load = load
