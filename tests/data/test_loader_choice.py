"""data.loader=auto: DALI on a GPU only when it can run there; otherwise the torchvision loader and a logged reason.
(No GPU is needed: the choice reads the device type and DALI's CUDA build and driver versions, which are stubbed.)"""

from __future__ import annotations

import builtins
import logging
import sys

import pytest
import torch

from fastft.config import DataConfig
from fastft.data import loaders
from fastft.parallel.env import DistEnv

GPU = DistEnv(device=torch.device("cuda", 0))
CPU = DistEnv(device=torch.device("cpu"))

pytestmark = pytest.mark.skipif(not loaders.dali_available(), reason="NVIDIA DALI is not installed")


def _choose(env: DistEnv, caplog) -> tuple[str, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastft"):
        kind = loaders.resolve_loader(DataConfig(loader="auto"), env)
    return kind, " ".join(r.getMessage() for r in caplog.records)


def _driver(monkeypatch, built: int, driver: int) -> None:
    import nvidia.dali.backend as backend

    monkeypatch.setattr(backend, "__cuda_version__", built, raising=False)
    monkeypatch.setattr(backend, "GetCudaVersion", lambda: driver)


def test_dali_on_a_gpu_whose_driver_runs_its_cuda(monkeypatch, caplog) -> None:
    _driver(monkeypatch, 13000, 13020)
    assert _choose(GPU, caplog) == ("dali", "")
    assert _choose(CPU, caplog)[0] == "torch"  # CPU: the torchvision loader, as before


def test_a_cuda_13_dali_under_a_cuda_12_driver_falls_back_naming_the_extra(monkeypatch, caplog) -> None:
    _driver(monkeypatch, 13000, 12080)
    kind, said = _choose(GPU, caplog)
    assert kind == "torch"
    assert "built for CUDA 13" in said and "CUDA 12" in said and "fastft[dali-cuda12]" in said


def test_dali_that_cannot_be_imported_falls_back_with_the_error(monkeypatch, caplog) -> None:
    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise ImportError("libcudart.so.13: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.startswith("nvidia.dali")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", failing)
    kind, said = _choose(GPU, caplog)
    assert kind == "torch" and "libcudart.so.13" in said
