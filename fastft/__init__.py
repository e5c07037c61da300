"""fastft: fast, exact fine-tuning of pretrained torchvision backbones.

    import fastft
    cfg = fastft.load_config("run.toml", ["--optim.lr=0.01"])
    result = fastft.finetune(cfg)          # -> RunResult(run_dir, metrics, best, paths, throughput)
    fastft.evaluate("runs/x/best.pt", "data/test")

Heavy modules (torch, torchvision, DALI, DeepSpeed) are imported on first use, so `import fastft` stays fast.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastft.config import FinetuneConfig, load_config
from fastft.errors import CheckpointError, ConfigError, DataError, FastftError, ModelError

_IMPORT_T0 = time.perf_counter()  # a command-line run's set-up timings count the imports from here

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FastftError",
    "FinetuneConfig",
    "ModelError",
    "evaluate",
    "finetune",
    "load_config",
    "predict",
]

if TYPE_CHECKING:
    from fastft.api import evaluate, predict
    from fastft.train import finetune


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from fastft.train import finetune

        return finetune
    if name in ("evaluate", "predict"):
        from fastft import api

        return getattr(api, name)
    raise AttributeError(name)
