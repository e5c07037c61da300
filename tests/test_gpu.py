"""The CUDA paths: auto precision, device-resident synthetic batches, DALI's GPU decoder against its CPU pipeline (in
evaluation and in augmented training), and a whole run on the GPU (DALI input, compiled head, auto precision).
Skipped, with the reason, without a CUDA GPU; `benchmarks/gpu_check.sh` runs them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

pytestmark = pytest.mark.gpu

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_auto_precision_is_bf16_on_a_gpu_that_computes_it() -> None:
    from fastft.config import PrecisionConfig
    from fastft.precision import resolve_precision

    p = resolve_precision(PrecisionConfig("auto"), torch.device("cuda", 0))
    assert p.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


def test_synthetic_batches_live_on_the_gpu(shapes4) -> None:
    from fastft.config import DataConfig
    from fastft.data.folder import index_from_config
    from fastft.data.loaders import build_loader
    from fastft.data.transforms import TransformSpec
    from fastft.parallel.env import DistEnv

    cfg = DataConfig(root=str(shapes4), loader="synthetic", batch_size=8)
    index = index_from_config(cfg)
    env = DistEnv(device=torch.device("cuda", 0))
    loader = build_loader(index.train, TransformSpec(32, 36), cfg, train=True, seed=0, env=env)
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == "cuda"
    assert images.shape == (8, 3, 32, 32) and labels.dtype == torch.long


def test_dali_gpu_decode_matches_the_cpu_pipeline(shapes4) -> None:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from fastft.data.dali_loader import DaliLoader

    files = sorted(str(p) for p in (shapes4 / "val").rglob("*.jpg"))
    samples = [(f, i) for i, f in enumerate(files)]
    common = {"train": False, "batch_size": 8, "crop_size": 32, "resize_size": 36, "mean": MEAN, "std": STD}
    cpu = [(x, y) for x, y in DaliLoader(samples, **common, device="cpu")]
    gpu = [(x, y) for x, y in DaliLoader(samples, **common, device="cuda", device_id=0)]
    assert all(x.device.type == "cuda" for x, _ in gpu)
    assert torch.equal(torch.cat([y for _, y in gpu]).cpu(), torch.cat([y for _, y in cpu]))  # same files, order
    diff = (torch.cat([x for x, _ in gpu]).cpu() - torch.cat([x for x, _ in cpu])).abs()
    # nvJPEG and libjpeg-turbo may differ by an 8-bit level or two on a pixel; the geometry is the same
    assert diff.mean().item() < 0.02, diff.mean().item()


def test_dali_gpu_training_crops_match_the_cpu_pipeline(shapes4) -> None:
    """Training with augmentation: the GPU's ROI decode of each sample's window (`decoders.image_slice`, mixed) gives
    the CPU pipeline's crops and flips."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from fastft.data.dali_loader import DaliLoader

    files = sorted(str(p) for p in (shapes4 / "train").rglob("*.jpg"))
    samples = [(f, i) for i, f in enumerate(files)]
    common = {"train": True, "batch_size": 8, "crop_size": 32, "resize_size": 36, "mean": MEAN, "std": STD, "seed": 3}
    cpu = list(DaliLoader(samples, **common, device="cpu"))
    gpu = list(DaliLoader(samples, **common, device="cuda", device_id=0))
    assert torch.equal(torch.cat([y for _, y in gpu]).cpu(), torch.cat([y for _, y in cpu]))  # same samples, order
    diff = (torch.cat([x for x, _ in gpu]).cpu() - torch.cat([x for x, _ in cpu])).abs()
    assert diff.mean().item() < 0.02, diff.mean().item()  # a window or flip of its own would differ by far more


def test_a_run_on_the_gpu_with_dali_compile_and_auto_precision(shapes4, tmp_path) -> None:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from safetensors.torch import load_file

    import fastft
    from fastft.train import finetune

    cfg = tiny_config(
        shapes4,
        tmp_path,
        run__device="cuda",
        data__loader="dali",
        compile__target="head",
        precision__dtype="auto",
        model__channels_last=True,
        data__workers=2,
    )
    result = finetune(cfg)
    assert result.metrics["num_samples"] == 24  # every val image counted once
    assert all(v > 0 for v in result.throughput.values())
    head = load_file(result.paths["head_export"])
    assert {v.dtype for v in head.values()} == {torch.float32}
    # The checkpoint evaluates the same way on the CPU (torchvision loader, fp32): same images, same size.
    cpu = fastft.evaluate(result.paths["last"], shapes4 / "val", device="cpu", precision="fp32", workers=0)
    assert cpu.metrics["num_samples"] == 24
    assert abs(cpu.metrics["top1"] - result.metrics["top1"]) <= 3 / 24  # decoders and bf16 vs fp32 may flip a few
