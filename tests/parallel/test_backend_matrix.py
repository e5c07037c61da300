"""Every backend with every freeze policy, precision and memory format, on 2 CPU ranks (gloo).

resnet18: {ddp, deepspeed ZeRO 0/1/2} x {backbone, until:layer3, none} x {fp32 with channels_last on and off, bf16
with it on}; ZeRO 1 (which shards only the optimizer state; tests/parallel/test_deepspeed.py checks every stage in
bf16 too) in fp32 only.
A small torchvision VisionTransformer (_matrix_worker.register_tiny_vit): deepspeed ZeRO 0/2 x the three policies
x {fp32, bf16}. Each case trains 2 steps (2 ranks x batch 2) from one initial weights file; all cases run in one
torchrun launch, and the single-process references (batch 4) in one plain launch of the same worker.

What each case must show:
- two finite step losses; the frozen part (parameters and frozen BatchNorm statistics) bit-identical to the initial
  file; every trainable tensor moved; the export in fp32 (DeepSpeed bf16 exports its fp32 masters);
- fp32, where one process with the global batch computes the same update (no trainable BatchNorm: resnet18's linear
  probe, every ViT policy, whose LayerNorm is per sample): the trainable weights equal the single-process run's
  within FP32_ATOL. With trainable BatchNorm each rank normalises over its own batch, as DDP without SyncBatchNorm
  does, so there the reference is the DDP run of the same case and DeepSpeed must equal it within FP32_ATOL;
- fp32 with channels_last off: the same update as with it on, to LAYOUT_RTOL (relative norm of the difference of
  the updates; only the summation order inside the convolutions differs, amplified by trainable BatchNorm);
- bf16, and fp16 where DeepSpeed has fp16 on the CPU (resnet18 until:layer3 under ZeRO 1/2, the ViT under ZeRO 2;
  fp16 with ZeRO 0 is refused; loss scale from 2**8 and no step skipped):
  the first step's loss (same weights, same batch) within BF16_LOSS_RTOL of the fp32 run of the same case, and
  an update pointing the same way as fp32's (cosine > BF16_MIN_COS). Measured: cosine >= 0.9998 for linear probes,
  >= 0.95 for until:layer3 and the ViT, about 0.75 for resnet18 with everything training, where bf16 rounding
  through 2x2 BatchNorm over 2 images is amplified the same way under DDP's autocast as under DeepSpeed.
Images are 64 px so that resnet18's layer4 BatchNorm sees 2x2 positions per image (at 32 px it sees one, the
normalised output is +-1 whatever the input, and the updates are chaotic). Loss decrease is not asserted: 2 steps
on 4 random images each do not promise it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, torchrun_cmd
from safetensors.torch import load_file, save_file

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'fastft[deepspeed]')")

WORKER = Path(__file__).with_name("_matrix_worker.py")
FP32_ATOL = 1e-5  # fp32 on both sides; only the summation order of the gradient reduction differs
LAYOUT_RTOL = 1e-2  # measured: 2e-6 (probe), 8e-6 (until:layer3), 2.4e-3 (none)
BF16_LOSS_RTOL = 3e-2  # measured: at most 0.6%
BF16_MIN_COS = 0.6
BACKENDS = [("ddp", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2)]
RESNET_POLICIES = {"backbone": ("fc.",), "until:layer3": ("layer4.", "fc."), "none": ("",)}
VIT_POLICIES = {
    "backbone": ("heads.",),
    "until:encoder.layers.encoder_layer_0": ("encoder.layers.encoder_layer_1.", "encoder.ln.", "heads."),
    "none": ("",),
}
MODELS = {"resnet18": RESNET_POLICIES, "vit_tiny_test": VIT_POLICIES}


def _name(model: str, backend: str, stage: int, freeze: str, dtype: str, cl: bool) -> str:
    kind = f"z{stage}" if backend == "deepspeed" else backend
    return f"{model}-{kind}-{freeze.replace(':', '_')}-{dtype}-{'cl' if cl else 'nchw'}"


def _cases() -> list[dict]:
    cases = []
    for backend, stage in BACKENDS:
        for freeze in RESNET_POLICIES:
            cases += [("resnet18", backend, stage, freeze, "fp32", cl) for cl in (True, False)]
            if stage != 1:  # the memory layout is checked in fp32, where the updates must agree to LAYOUT_RTOL
                cases.append(("resnet18", backend, stage, freeze, "bf16", True))
    for stage in (0, 2):
        for freeze in VIT_POLICIES:
            for dtype in ("fp32", "bf16"):
                cases.append(("vit_tiny_test", "deepspeed", stage, freeze, dtype, True))
    # DeepSpeed's fp16 (dynamic loss scaling), checked like bf16 against the fp32 run of the same case
    cases += [("resnet18", "deepspeed", stage, "until:layer3", "fp16", True) for stage in (1, 2)]  # 0: refused
    cases.append(("vit_tiny_test", "deepspeed", 2, "none", "fp16", True))
    keys = ("model", "backend", "zero_stage", "freeze", "dtype", "channels_last")
    return [{"name": _name(*c), **dict(zip(keys, c))} for c in cases]


def _cpu_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu" and bool(get_accelerator().is_fp16_supported())


CPU_FP16 = _cpu_fp16()  # DeepSpeed allows fp16 on CPUs with AVX512-FP16 / AMX-FP16 only
CASES = _cases()
RUN = [c for c in CASES if c["dtype"] != "fp16" or CPU_FP16]
NO_FP16 = pytest.mark.skip(reason="DeepSpeed has no fp16 on this CPU")
PARAMS = [pytest.param(c, id=c["name"], marks=[] if c in RUN else [NO_FP16]) for c in CASES]


def _reference_cases() -> list[dict]:
    """fp32, one process, batch 4: where the same update follows from the same global batch (no trainable BN)."""
    refs = [("resnet18", "backbone", cl) for cl in (True, False)]
    refs += [("vit_tiny_test", freeze, True) for freeze in VIT_POLICIES]
    return [
        {
            "name": _name(model, "single", 0, freeze, "fp32", cl),
            "model": model,
            "backend": "none",
            "freeze": freeze,
            "dtype": "fp32",
            "channels_last": cl,
        }
        for model, freeze, cl in refs
    ]


def _run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900, check=False)
    text = log.read_text()
    assert p.returncode == 0, text[-6000:]
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def matrix(module_tmp):
    """Data, one initial weights file per model, then both launches; returns (run folder parent, initial states)."""
    sys.path.insert(0, str(WORKER.parent))
    from _matrix_worker import register_tiny_vit

    from fastft.config import ModelConfig
    from fastft.data.synthetic import make_image_folder
    from fastft.model import build_model

    base = module_tmp("matrix")
    root = make_image_folder(base / "data", num_classes=2, train_per_class=4, val_per_class=1, image_size=32, seed=4)
    register_tiny_vit()
    weights, initial = {}, {}
    for model in MODELS:
        torch.manual_seed(0)
        state = {
            k: v.contiguous() for k, v in build_model(ModelConfig(name=model, weights="none"), 2).state_dict().items()
        }
        weights[model] = str(base / f"{model}.safetensors")
        save_file(state, weights[model])
        initial[model] = state
    from torchvision.models import _api

    _api.BUILTIN_MODELS.pop("vit_tiny_test")  # the registry is process-global: leave it as other tests expect

    def spec(name: str, batch: int, cases: list[dict]) -> Path:
        path = base / f"{name}.json"
        payload = {"root": str(root), "out": str(base / "runs"), "batch_size": batch, "weights": weights}
        path.write_text(json.dumps({**payload, "cases": cases}))
        return path

    wall = _run(torchrun_cmd(2, str(WORKER), str(spec("matrix", 2, RUN))), base / "matrix.log")
    wall_ref = _run([sys.executable, str(WORKER), str(spec("single", 4, _reference_cases()))], base / "single.log")
    print(f"\nbackend matrix: {len(RUN)} cases in {wall:.0f}s; {len(_reference_cases())} references {wall_ref:.0f}s")
    return base / "runs", initial


def _trainable(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(p) for p in prefixes)


@functools.lru_cache(maxsize=8)
def _load(path: Path) -> dict[str, torch.Tensor]:
    """References are compared against by several cases: read them once (read-only use; 8 resnet18 exports ~ 360 MB)."""
    return load_file(path)


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def _update(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([(state[k].double() - start[k].double()).flatten() for k in names])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in names)


@pytest.mark.parametrize("case", PARAMS)
def test_case_trains_its_part_and_matches_its_reference(matrix, case) -> None:
    runs, initial = matrix
    model, freeze, dtype = case["model"], case["freeze"], case["dtype"]
    run = runs / case["name"]
    events = _events(run)
    assert events[0]["world_size"] == 2
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses

    trained, start = load_file(run / "model.safetensors"), initial[model]
    assert trained.keys() == start.keys()
    assert {v.dtype for v in trained.values() if v.is_floating_point()} == {torch.float32}
    prefixes = MODELS[model][freeze]
    params = {k for k in start if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    trainable = sorted(k for k in params if _trainable(k, prefixes))
    frozen = [k for k in start if not _trainable(k, prefixes)]  # parameters and frozen BatchNorm statistics
    for k in frozen:
        assert torch.equal(trained[k], start[k]), f"frozen {k} changed"
    unmoved = [k for k in trainable if torch.equal(trained[k], start[k])]
    assert not unmoved, f"trainable tensors that did not change: {unmoved[:5]}"

    if dtype == "fp16":  # the loss scale starts at 2**8 here (_matrix_worker): no step may be skipped
        assert events[-1]["event"] == "end" and events[-1]["skipped_steps"] == 0
    if dtype != "fp32":
        fp32_run = runs / case["name"].replace(f"-{dtype}-", "-fp32-")
        fp32_loss = next(e["loss"] for e in _events(fp32_run) if e["event"] == "step")
        assert abs(losses[0] - fp32_loss) < BF16_LOSS_RTOL * fp32_loss, (losses[0], fp32_loss)
        cos = _cosine(
            _update(trained, start, trainable), _update(_load(fp32_run / "model.safetensors"), start, trainable)
        )
        assert cos > BF16_MIN_COS, f"{dtype} vs fp32 update: cosine {cos:.3f}"
        return
    bn_trains = model == "resnet18" and freeze != "backbone"
    if bn_trains:
        if case["backend"] == "ddp":
            return  # the reference of this row
        reference = runs / _name(model, "ddp", 0, freeze, "fp32", case["channels_last"])
    else:
        reference = runs / _name(model, "single", 0, freeze, "fp32", case["channels_last"])
    diff = _max_diff(trained, _load(reference / "model.safetensors"), trainable)
    assert diff < FP32_ATOL, f"vs {reference.name}: max |difference| {diff:.3g}"
    if not case["channels_last"]:
        update = _update(trained, start, trainable)
        on = _update(_load(runs / case["name"].replace("-nchw", "-cl") / "model.safetensors"), start, trainable)
        rel = ((update - on).norm() / on.norm()).item()
        assert rel < LAYOUT_RTOL, f"channels_last off vs on: relative difference of the updates {rel:.3g}"
