"""Precision resolution on GPUs that do and do not compute bf16 in hardware (the device capability is mocked, so the
choice is tested on this CPU-only machine too)."""

from __future__ import annotations

import pytest
import torch

from fastft.config import PrecisionConfig
from fastft.errors import ConfigError
from fastft.precision import resolve_precision

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a CUDA GPU of a given compute capability. `is_bf16_supported` says True for all of them, as it
    does for V100/T4, where bf16 is emulated."""

    def with_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return with_capability


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 0), torch.float32),  # V100: emulated bf16
        ((7, 5), torch.float32),  # T4
        ((8, 0), torch.bfloat16),  # A100
        ((8, 9), torch.bfloat16),  # L4
        ((9, 0), torch.bfloat16),  # H100 / H200
    ],
)
def test_auto_picks_bf16_only_where_the_gpu_computes_it(gpu, capability, expected) -> None:
    gpu(*capability)
    assert resolve_precision(PrecisionConfig("auto"), CUDA).dtype == expected


def test_explicit_bf16_on_a_gpu_without_it_is_a_one_line_error(gpu) -> None:
    gpu(7, 5)
    with pytest.raises(ConfigError, match=r"^precision\.dtype: bf16 on this GPU \(compute capability 7\.5\)") as e:
        resolve_precision(PrecisionConfig("bf16"), CUDA)
    assert "\n" not in str(e.value)


def test_explicit_bf16_on_a_gpu_with_it_is_kept(gpu) -> None:
    gpu(8, 0)
    p = resolve_precision(PrecisionConfig("bf16"), CUDA)
    assert p.dtype == torch.bfloat16 and p.make_scaler() is None
