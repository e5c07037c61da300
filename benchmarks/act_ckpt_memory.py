"""Peak memory and img/s of a full fine-tune with and without activation checkpointing, side by side.

    python benchmarks/act_ckpt_memory.py --model vit_b_16 --batch 32 --image-size 224 --steps 2

Each case runs in its own process (so one case's peak cannot hide the other's): the model is built as a run builds it
(fastft.backbones, `model.weights = none`, `model.freeze = none`, the trainer's split with `act_ckpt.apply`), then
AdamW steps on a fixed random batch in fp32 (`--warmup` untimed steps first). Reported per case: peak RSS of the process
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), RSS once the model and its optimizer exist (before the first step), and
on CUDA `torch.cuda.max_memory_allocated`; img/s over the timed steps (synchronised)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(model_name: str, batch: int, image_size: int, steps: int, warmup: int, on: bool) -> dict:
    """One case in this process: build, `warmup` untimed steps, `steps` timed steps."""
    from fastft import act_ckpt
    from fastft.backbones import build_backbone, trace_options
    from fastft.backbones.freeze import freeze
    from fastft.backbones.split import split_model
    from fastft.config import ModelConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(name=model_name, weights="none", freeze="none", activation_checkpointing=on)
    backbone = build_backbone(cfg, 10, image_size=image_size)
    model = backbone.model.to(device)
    freeze(model, "none", head=backbone.head, stages=backbone.stages())
    leaves = act_ckpt.apply(model, on=on)
    split = split_model(model, head=backbone.head, trace=trace_options(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model.train()
    built_rss = _rss_mb()

    def step() -> float:
        loss = torch.nn.functional.cross_entropy(split.forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {
        "activation_checkpointing": on,
        "checkpointed_blocks": len(leaves),
        "split": split.kind,
        "rss_after_build_mb": round(built_rss, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cuda_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "img_s": round(batch * steps / elapsed, 2),
        "step_s": round(elapsed / steps, 2),
    }


def _hardware() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        pass
    import torchvision

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b_16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=2, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--case", choices=("on", "off"), help="run one case in this process (used by the parent)")
    args = ap.parse_args()
    if args.case:
        result = run_case(args.model, args.batch, args.image_size, args.steps, args.warmup, args.case == "on")
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {"hardware": _hardware(), "args": vars(args), "cases": []}
    for case in ("off", "on"):
        cmd = [sys.executable, __file__, "--case", case, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results["cases"].append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    off, on = results["cases"]
    results["peak_rss_ratio_on_off"] = round(on["peak_rss_mb"] / off["peak_rss_mb"], 3)
    results["img_s_ratio_on_off"] = round(on["img_s"] / off["img_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
