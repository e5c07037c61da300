"""Run many short fastft trainings in one launch: `torchrun ... _matrix_worker.py CASES.json` (or plain `python` for
single-process references). Starting a process and DeepSpeed once per launch instead of once per case keeps the
backend matrix (tests/parallel/test_backend_matrix.py) within a few minutes on two CPU cores.

CASES.json: {"root": data folder, "out": run folder parent, "batch_size": per-rank batch, "weights": {model: initial
weights file}, "cases": [{"name", "model", "freeze", "backend", "zero_stage", "dtype", "channels_last"}, ...]}.
Each case trains 2 steps and writes its run folder out/<name> (events.jsonl, model.safetensors) as `fastft train`
does. Under torchrun the process group is created here once and every case adopts it, as an embedding job's would be.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from fastft.config import FinetuneConfig
from fastft.train import finetune

TINY_VIT = "vit_tiny_test"


def register_tiny_vit() -> None:
    """Register `vit_tiny_test`: torchvision's own VisionTransformer (the class behind vit_b_16) at 64 px, patch 16,
    2 encoder layers of width 64, so fastft builds, splits and exports it exactly as it does vit_b_16. Test-only: the
    registry is torchvision's, read by fastft's model lookup."""
    from torchvision.models import _api
    from torchvision.models.vision_transformer import VisionTransformer

    if TINY_VIT in _api.BUILTIN_MODELS:
        return

    def vit_tiny_test(*, weights=None, progress: bool = True, **kwargs):
        assert weights is None, "no published weights"
        return VisionTransformer(
            image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, **kwargs
        )

    vit_tiny_test.__module__ = "torchvision.models.vision_transformer"  # list_models(module=torchvision.models)
    _api.register_model(TINY_VIT)(vit_tiny_test)


def case_config(case: dict, spec: dict) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights = case["model"], spec["weights"][case["model"]]
    cfg.model.freeze, cfg.model.channels_last = case["freeze"], case["channels_last"]
    cfg.data.root, cfg.data.image_size, cfg.data.workers = spec["root"], 64, 0
    cfg.data.batch_size = spec["batch_size"]
    cfg.precision.dtype = case["dtype"]
    cfg.compile.target = "none"
    cfg.optim.max_steps, cfg.optim.lr, cfg.optim.momentum = 2, 0.05, 0.9
    cfg.parallel.backend, cfg.parallel.zero_stage = case["backend"], case.get("zero_stage", 0)
    cfg.run.out_dir, cfg.run.name, cfg.run.device, cfg.run.seed = spec["out"], case["name"], "cpu", 3
    cfg.log.progress, cfg.log.tensorboard, cfg.log.every_steps = False, False, 1
    if case["dtype"] == "fp16":
        # DeepSpeed's dynamic loss scale starts at 2**16 and halves per overflowing step: 2 steps leave it no room to
        # come down (the ViT's both steps would be skipped). Start at 2**8; the scaler itself is DeepSpeed's.
        path = Path(spec["out"]) / "fp16-scale.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fp16": {"enabled": True, "initial_scale_power": 8}}))
        cfg.parallel.deepspeed_config = str(path)
    return cfg.validate()


def _drop_checkpoints(run: Path) -> None:
    """Keep what the test reads (events.jsonl, model.safetensors): dozens of cases' checkpoints would fill /tmp."""
    for name in ("last.pt", "best.pt", "head.safetensors", "confusion_matrix.png"):
        (run / name).unlink(missing_ok=True)
    shutil.rmtree(run / "deepspeed", ignore_errors=True)


def main(path: str) -> None:
    spec = json.loads(Path(path).read_text())
    register_tiny_vit()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    for case in spec["cases"]:
        t0 = time.perf_counter()
        try:
            finetune(case_config(case, spec))
        except Exception as e:
            raise RuntimeError(f"case {case['name']} failed: {type(e).__name__}: {e}") from e
        if not distributed or dist.get_rank() == 0:
            _drop_checkpoints(Path(spec["out"]) / case["name"])
            print(f"matrix case {case['name']}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
