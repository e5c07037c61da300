"""Checkpoint bytes of a linear probe (frozen backbone, new head) and the cost of the frozen part's fingerprint.

    python benchmarks/checkpoint_size.py --out /tmp/ckpt-size --model resnet50

Nothing is downloaded: the backbone's weights are a random initialisation saved to a local file (`model.weights`
points at it, as a pretrained file would). One optimizer step on 8 synthetic 32 px images, then the sizes of
last.pt, best.pt and model.safetensors. Run it with PYTHONPATH at an older checkout for the "before" figures (the
fingerprint timing is skipped where fastft has none)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
import torchvision

import fastft
from fastft.config import FinetuneConfig
from fastft.data.synthetic import make_image_folder
from fastft.train import finetune


def _config(data: Path, out: Path, model: str, weights: Path) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights, cfg.model.freeze = model, str(weights), "backbone"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(data), 32, 4, 0
    cfg.precision.dtype, cfg.compile.target = "fp32", "none"
    cfg.optim.max_steps = 1
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), "probe", "cpu"
    cfg.log.progress, cfg.log.tensorboard = False, False
    return cfg.validate()


def _digest_seconds(model_name: str, weights: Path, repeats: int) -> dict | None:
    """Median wall and CPU time of the frozen part's digest (as a save or a load computes it), on a model frozen as
    the run is."""
    try:
        from fastft.checkpoint import frozen_digest, frozen_keys
    except ImportError:
        return None
    from fastft.backbones.freeze import freeze
    from fastft.config import ModelConfig
    from fastft.model import build_model

    model = build_model(ModelConfig(name=model_name, weights=str(weights)), 4)
    freeze(model, "backbone", head=model.fastft_head)
    keys, state = frozen_keys(model), model.state_dict()
    wall, cpu, nbytes = [], [], 0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        _, nbytes = frozen_digest(state, keys)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # this process's CPU time: what a busy shared host does not inflate
    return {
        "tensors": len(keys),
        "bytes": nbytes,
        "median_wall_s": statistics.median(wall),
        "median_cpu_s": statistics.median(cpu),
        "wall_s": wall,
        "cpu_s": cpu,
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="scratch folder (removed first)")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--repeats", type=int, default=5, help="digest timings")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    data = make_image_folder(out / "data", num_classes=4, train_per_class=2, val_per_class=1, image_size=32, seed=0)
    torch.manual_seed(0)
    weights = out / f"{args.model}.pth"
    torch.save(torchvision.models.get_model(args.model).state_dict(), weights)
    result = finetune(_config(data, out / "runs", args.model, weights))
    run = result.run_dir
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    report = {
        "fastft": str(Path(fastft.__file__).parent),
        "model": args.model,
        "weights_file_bytes": weights.stat().st_size,
        "last_pt_bytes": (run / "last.pt").stat().st_size,
        "best_pt_bytes": (run / "best.pt").stat().st_size,
        "best_is_last": (run / "best.pt").samefile(run / "last.pt"),
        "model_safetensors_bytes": (run / "model.safetensors").stat().st_size,
        "checkpoint_model_tensors": len(ckpt["model"]),
        "checkpoint_model_bytes": sum(t.numel() * t.element_size() for t in ckpt["model"].values()),
        "fingerprint": ckpt.get("frozen"),
        "digest": _digest_seconds(args.model, weights, args.repeats),
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
