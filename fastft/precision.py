"""Precision as one object: the resolved dtype, one autocast context, and a GradScaler only for fp16."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from fastft.config import PrecisionConfig
from fastft.errors import ConfigError

log = logging.getLogger("fastft")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic units (AVX512-BF16 or AMX); emulated bf16 is ~4x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def gpu_has_native_bf16(device: torch.device) -> bool:
    """True when the GPU computes bf16 in hardware: compute capability 8.0 (Ampere) or newer. Older GPUs (V100, T4)
    run bf16 by emulation, which `torch.cuda.is_bf16_supported()` counts as supported unless told otherwise."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device) >= (8, 0)


@dataclass
class Precision:
    dtype: torch.dtype
    device_type: str
    reason: str = ""

    @property
    def name(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        # bf16 has fp32's exponent range: no loss scaling needed. fp16 overflows without it.
        if self.dtype != torch.float16:
            return None
        return torch.amp.GradScaler(self.device_type)


def resolve_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    """Pick the dtype. `auto`: bf16 where the device computes it natively (recent GPUs, AVX512-BF16/AMX CPUs),
    fp32 elsewhere (fp16 is only used when asked for: it needs loss scaling and can overflow)."""
    kind = device.type
    if cfg.dtype == "auto":
        if kind == "cuda" and gpu_has_native_bf16(device):
            return Precision(torch.bfloat16, kind, "auto: GPU computes bf16 natively")
        if kind == "cpu" and cpu_has_native_bf16():
            return Precision(torch.bfloat16, kind, "auto: CPU has native bf16")
        return Precision(torch.float32, kind, f"auto: no native bf16 on this {kind}")
    dtype = _DTYPES[cfg.dtype]
    if dtype == torch.bfloat16 and kind == "cuda" and not gpu_has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"precision.dtype: bf16 on this GPU (compute capability {major}.{minor}) would be emulated, several times "
            f"slower; use fp16 or fp32 (native bf16 needs compute capability 8.0 or newer)"
        )
    if dtype == torch.float16 and kind == "cpu":
        log.warning("fastft: fp16 on CPU is emulated and slow; bf16 (or fp32) is the better choice there")
    if dtype == torch.bfloat16 and kind == "cpu" and not cpu_has_native_bf16():
        log.warning("fastft: bf16 on a CPU without native bf16 is emulated and several times slower than fp32")
    return Precision(dtype, kind, f"requested {cfg.dtype}")
