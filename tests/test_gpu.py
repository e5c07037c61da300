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


# GPUs by name: whether they compute bf16 in hardware (Ampere and newer) or emulate it (Volta, Turing).
_NATIVE_BF16 = (
    "A100",
    "A10",
    "A30",
    "A40",
    "L4",
    "L40",
    "H100",
    "H200",
    "H800",
    "B100",
    "B200",
    "GH200",
    "RTX 30",
    "RTX 40",
    "RTX 50",
    "RTX A",
)
_EMULATED_BF16 = ("V100", "T4", "P100", "RTX 20", "TITAN V")


def test_auto_precision_is_bf16_on_a_gpu_that_computes_it() -> None:
    from fastft.config import PrecisionConfig
    from fastft.precision import resolve_precision

    name = torch.cuda.get_device_name(0)
    if any(k in name for k in _EMULATED_BF16):
        expected = torch.float32
    elif any(k in name for k in _NATIVE_BF16):
        expected = torch.bfloat16
    else:
        pytest.skip(f"{name}: not in this test's table of GPUs with and without native bf16")
    assert resolve_precision(PrecisionConfig("auto"), torch.device("cuda", 0)).dtype == expected


def _max_sample_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-sample mean absolute difference (a mean over everything would hide one wrong sample)."""
    return (a - b).abs().flatten(1).mean(dim=1).max().item()


def test_synthetic_batches_live_on_the_gpu(shapes4) -> None:
    from fastft.config import DataConfig
    from fastft.data.index import index_from_config
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
    from fastft.data.dali_feed import DaliLoader

    files = sorted(str(p) for p in (shapes4 / "val").rglob("*.jpg"))
    samples = [(f, i) for i, f in enumerate(files)]
    common = {"train": False, "batch_size": 8, "crop_size": 32, "resize_size": 36, "mean": MEAN, "std": STD}
    cpu = [(x, y) for x, y in DaliLoader(samples, **common, device="cpu")]
    gpu = [(x, y) for x, y in DaliLoader(samples, **common, device="cuda", device_id=0)]
    assert all(x.device.type == "cuda" for x, _ in gpu)
    assert torch.equal(torch.cat([y for _, y in gpu]).cpu(), torch.cat([y for _, y in cpu]))  # same files, order
    err = _max_sample_error(torch.cat([x for x, _ in gpu]).cpu(), torch.cat([x for x, _ in cpu]))
    # nvJPEG and libjpeg-turbo may differ by an 8-bit level or two on a pixel; the geometry is the same
    assert err < 0.02, err


def test_dali_gpu_training_crops_match_the_cpu_pipeline(shapes4) -> None:
    """Training with augmentation: the GPU's ROI decode of each sample's window (`decoders.image_slice`, mixed) gives
    the CPU pipeline's crops and flips."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from fastft.data.dali_feed import DaliLoader

    files = sorted(str(p) for p in (shapes4 / "train").rglob("*.jpg"))
    samples = [(f, i) for i, f in enumerate(files)]
    common = {"train": True, "batch_size": 8, "crop_size": 32, "resize_size": 36, "mean": MEAN, "std": STD, "seed": 3}
    cpu = list(DaliLoader(samples, **common, device="cpu"))
    gpu = list(DaliLoader(samples, **common, device="cuda", device_id=0))
    assert torch.equal(torch.cat([y for _, y in gpu]).cpu(), torch.cat([y for _, y in cpu]))  # same samples, order
    err = _max_sample_error(torch.cat([x for x, _ in gpu]).cpu(), torch.cat([x for x, _ in cpu]))
    assert err < 0.02, err  # a window or flip of its own would differ by far more (per sample, not on average)


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


def test_compiled_suffix_does_not_recompile_after_warm_up() -> None:
    """The compiled trainable part (a partial fine-tune's suffix, with BatchNorm and stochastic depth) compiles once
    for training and once for evaluation; later steps, the ragged evaluation batch (padded) and switching modes back
    and forth add no graph."""
    from torch._dynamo.utils import counters

    from fastft.compile import apply_compile
    from fastft.config import CompileConfig, ModelConfig
    from fastft.evaluation import run_evaluation
    from fastft.model import build_model, freeze, split_model
    from fastft.precision import Precision

    torch._dynamo.reset()
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    model = build_model(ModelConfig(name="convnext_tiny", weights="none"), 5, image_size=64)
    freeze(model, "until:features.4")
    model.to(device)
    split = split_model(model)
    suffix = apply_compile(split.suffix, CompileConfig(target="head"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = torch.randn(21, 3, 64, 64, device=device)
    y = torch.randint(0, 5, (21,), device=device)
    with torch.no_grad():
        feats = split.prefix.eval()(x)

    def train_steps(n: int) -> None:
        split.suffix.train()
        for i in range(n):
            f = feats[(i % 2) * 8 : (i % 2) * 8 + 8]
            loss = torch.nn.functional.cross_entropy(suffix(f), y[:8])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def evaluate() -> dict:
        split.suffix.eval()
        batches = [(feats[i : i + 8], y[i : i + 8]) for i in range(0, 21, 8)]  # the last batch has 5
        return run_evaluation(
            suffix, batches, num_classes=5, device=device, precision=Precision(torch.float32, "cuda"), pad_to=8
        )

    train_steps(2)
    evaluate()
    warm = counters["stats"]["unique_graphs"]
    assert warm >= 2  # one graph per mode (the counter sees compiles)
    train_steps(3)
    report = evaluate()
    train_steps(2)
    evaluate()
    assert counters["stats"]["unique_graphs"] == warm
    assert report["num_samples"] == 21
