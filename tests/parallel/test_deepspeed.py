"""DeepSpeed on CPU (gloo): the generated config; the backend against LocalBackend in one process (accumulation,
clipping, LR schedule, checkpoint folders, code-free loading); ZeRO 0/1/2 under torchrun against one process on the
same global batch; resume after killing a real run; the launcher script."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import REPO, child_pids, free_port, run_deepspeed_launcher, run_torchrun, tiny_config
from safetensors.torch import load_file
from torch import nn

from fastft.config import FinetuneConfig
from fastft.errors import CheckpointError, ConfigError
from fastft.optim import Schedule, build_optimizer, param_groups
from fastft.parallel import env as penv
from fastft.parallel.backend import LocalBackend
from fastft.parallel.deepspeed import DeepSpeedBackend, DeepSpeedOptions, build_config  # DeepSpeed: when used
from fastft.parallel.env import DistEnv
from fastft.precision import Precision

pytestmark = pytest.mark.deepspeed
pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'fastft[deepspeed]')")

FP32, BF16, FP16 = (Precision(torch.float32, "cpu"), Precision(torch.bfloat16, "cpu"), Precision(torch.float16, "cuda"))
EXAMPLE_JSON = REPO / "launchers" / "ds_config.example.json"
ATOL = 1e-5  # fp32 heads; only the order of the gradient all-reduce / reduce-scatter sums differs


def _cfg(**sections) -> FinetuneConfig:
    cfg = FinetuneConfig()
    for key, value in sections.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg.validate()


def _config(cfg: FinetuneConfig, env: DistEnv, precision: Precision) -> dict:
    return build_config(DeepSpeedOptions.from_config(cfg), env, precision)


def _backend(cfg: FinetuneConfig, env: DistEnv, precision: Precision) -> DeepSpeedBackend:
    return DeepSpeedBackend(DeepSpeedOptions.from_config(cfg), env, precision)


# --------------------------------------------------------------------------------------------------------------------
# build_config: pure, no process group


def test_generated_config_follows_fastft_config() -> None:
    cfg = _cfg(data__batch_size=4, optim__grad_accum=3, parallel__zero_stage=2)
    ds = _config(cfg, DistEnv(world_size=2), FP32)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 3, 24)
    assert ds["zero_optimization"] == {"stage": 2}
    # DeepSpeed's own default is 1.0: "off" must be written as 0, or every run would be clipped.
    assert ds["gradient_clipping"] == 0.0
    assert "bf16" not in ds and "fp16" not in ds
    assert _config(_cfg(optim__clip_grad_norm=0.5), DistEnv(), FP32)["gradient_clipping"] == 0.5
    assert _config(cfg, DistEnv(), BF16)["bf16"] == {"enabled": True}
    fp16 = _config(cfg, DistEnv(), FP16)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert "bf16" not in _config(cfg, DistEnv(), FP16)


def test_user_json_is_merged_over_the_generated_config(tmp_path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"overlap_comm": True, "stage": 2},
                "train_batch_size": 16,
                "bf16": {"enabled": True, "immediate_grad_update": True},
                "steps_per_print": 7,
            }
        )
    )
    ds = _config(
        _cfg(data__batch_size=8, parallel__zero_stage=1, parallel__deepspeed_config=str(user)),
        DistEnv(world_size=2),
        BF16,
    )
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # user keys win, nested keys merge
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["steps_per_print"] == 7 and ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.0


def test_example_json_merges_and_auto_keys_take_fastft_values() -> None:
    ds = _config(
        _cfg(
            data__batch_size=4,
            optim__grad_accum=2,
            parallel__zero_stage=2,
            parallel__deepspeed_config=str(EXAMPLE_JSON),
        ),
        DistEnv(world_size=3),
        FP32,
    )
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 2, 24)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize(
    ("key", "value", "fastft_key"),
    [
        ("train_micro_batch_size_per_gpu", 16, "data.batch_size"),
        ("gradient_accumulation_steps", 4, "optim.grad_accum"),
        ("train_batch_size", 64, "data.batch_size x optim.grad_accum x world size"),
        ("gradient_clipping", 1.0, "optim.clip_grad_norm"),
    ],
)
def test_user_json_contradicting_fastft_names_key_and_file(tmp_path, key, value, fastft_key) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError) as e:
        _config(_cfg(data__batch_size=8, parallel__deepspeed_config=str(user)), DistEnv(world_size=2), FP32)
    assert key in str(e.value) and str(user) in str(e.value) and fastft_key in str(e.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
        ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
        ({"bf16": {"enabled": True}}, "bf16.enabled"),  # fastft precision is fp32: autocast would not match
    ],
)
def test_user_json_sections_fastft_owns_are_refused(tmp_path, content, needle) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _config(_cfg(parallel__deepspeed_config=str(user)), DistEnv(), FP32)


def test_zero_stage_3_is_refused_naming_where_it_was_set(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^parallel\.zero_stage: expected one of 0 \| 1 \| 2, got 3"):
        _cfg(parallel__zero_stage=3)  # refused when the config is read, before any run folder exists
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage in .*ds\.json"):
        _config(_cfg(parallel__zero_stage=1, parallel__deepspeed_config=str(user)), DistEnv(), FP32)


def test_fp16_with_zero_stage_0_is_refused() -> None:
    """DeepSpeed 0.19.8 leaves the loss unscaled under ZeRO 0 fp16 while its optimizer unscales the gradients."""
    with pytest.raises(ConfigError, match=r"^parallel\.zero_stage: fp16 with ZeRO stage 0 does not train"):
        _config(_cfg(parallel__zero_stage=0), DistEnv(), FP16)
    assert _config(_cfg(parallel__zero_stage=1), DistEnv(), FP16)["fp16"]["enabled"]


def test_missing_or_invalid_user_json_names_the_file(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"parallel\.deepspeed_config: no such file .*nope\.json"):
        _config(_cfg(parallel__deepspeed_config=str(missing)), DistEnv(), FP32)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 1},}')
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        _config(_cfg(parallel__deepspeed_config=str(bad)), DistEnv(), FP32)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json must hold a JSON object"):
        _config(_cfg(parallel__deepspeed_config=str(listed)), DistEnv(), FP32)


# --------------------------------------------------------------------------------------------------------------------
# The backend in this process (a one-rank gloo group it creates and fastft destroys)


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # restored afterwards; DeepSpeed requires the variable
    assert not dist.is_initialized()
    env = DistEnv()
    yield env
    penv.shutdown(env)
    assert not dist.is_initialized(), "the backend's one-rank group must be owned, and so ended, by fastft"


def _toy(scale: float = 20.0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    head = nn.Linear(16, 4)
    # Large inputs by default: gradient norms well above DeepSpeed's default clip of 1.0, so a silent clip shows.
    data = [(torch.randn(4, 16) * scale, torch.randint(0, 4, (4,))) for _ in range(8)]
    return head, data


def _optimizer(module: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """As train.py builds it: two groups (weight decay on weights only), each with its lr_scale."""
    return build_optimizer(
        param_groups(module, [n for n, _ in module.named_parameters()], optim_cfg, head=""), optim_cfg
    )


def _train(backend, module: nn.Module, data, accum: int, schedule) -> list[bool]:
    optim_cfg = _cfg(optim__grad_accum=accum, optim__lr=0.05, optim__weight_decay=0.01, optim__schedule=schedule).optim
    optimizer = _optimizer(module, optim_cfg)
    scheduler = Schedule(optimizer, optim_cfg, total_steps=len(data) // accum)  # writes group["lr"] every step
    model = backend.wrap(module, optimizer)
    results = []
    for i, (x, y) in enumerate(data):
        boundary = (i + 1) % accum == 0
        with backend.no_sync() if not boundary else contextlib.nullcontext():
            backend.backward(F.cross_entropy(model(x), y))
        results.append(backend.step(boundary))
        if boundary:
            scheduler.step()
    assert optimizer.param_groups[0]["lr"] < 0.05 or schedule == "constant"
    return results


@pytest.mark.parametrize(
    ("stage", "clip", "example_json"), [(0, 0.0, False), (1, 0.0, False), (2, 0.0, False), (2, 0.5, True)]
)
def test_backend_matches_local_backend_accumulation_clipping_schedule(one_rank, stage, clip, example_json) -> None:
    """Same micro-batches, accum 2, cosine LR: the engine's update equals LocalBackend's (1/accum scaling by
    DeepSpeed, clipping only when asked for, the schedule reaching DeepSpeed's wrapped optimizer). The last case
    also runs with the example user JSON (overlap_comm, buckets, fp32 communication)."""
    local_head, data = _toy()
    ds_head, _ = _toy()
    x, y = data[0]
    probe = _toy()[0]
    F.cross_entropy(probe(x), y).backward()
    assert torch.cat([p.grad.flatten() for p in probe.parameters()]).norm() > 2.0  # DeepSpeed's 1.0 clip would bite

    local = LocalBackend(clip_grad_norm=clip, grad_accum=2)
    assert all(_train(local, local_head, data, 2, "cosine"))
    cfg = _cfg(
        data__batch_size=4,
        optim__grad_accum=2,
        optim__clip_grad_norm=clip,
        parallel__zero_stage=stage,
        parallel__deepspeed_config=str(EXAMPLE_JSON) if example_json else "",
    )
    backend = _backend(cfg, one_rank, FP32)
    assert all(_train(backend, ds_head, data, 2, "cosine")) and backend.skipped_steps == 0
    assert backend.engine.zero_optimization_stage() == stage
    assert backend.engine.global_steps == 4
    moved = (local_head.weight - _toy()[0].weight).abs().max().item()
    assert moved > 0.01  # far above the tolerance below
    for a, b in zip(local_head.parameters(), ds_head.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-6, rtol=1e-5)


def test_bf16_module_weights_are_bf16_copies_of_fp32_masters(one_rank) -> None:
    """DeepSpeed's bf16 section casts the wrapped module to bf16 (what train.py saves and exports) and keeps fp32
    master weights in the optimizer; training still follows fp32 training closely."""
    from deepspeed.utils import safe_get_full_fp32_param

    local_head, data = _toy(scale=1.0)
    ds_head, _ = _toy(scale=1.0)
    _train(LocalBackend(grad_accum=1), local_head, data, 1, "constant")
    backend = _backend(_cfg(data__batch_size=4, parallel__zero_stage=1), one_rank, BF16)
    optimizer = _optimizer(ds_head, _cfg(optim__lr=0.05, optim__weight_decay=0.01).optim)
    model = backend.wrap(ds_head, optimizer)
    scheduler = Schedule(optimizer, _cfg(optim__lr=0.05, optim__schedule="constant").optim, len(data))
    for x, y in data:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py's precision.autocast()
            logits = model(x)
        backend.backward(F.cross_entropy(logits.float(), y))
        assert backend.step(True)
        scheduler.step()
    for local, p in zip(local_head.parameters(), ds_head.parameters()):
        master = safe_get_full_fp32_param(p)
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        torch.testing.assert_close(p.detach(), master.to(torch.bfloat16), atol=0, rtol=0)
        torch.testing.assert_close(master, local.detach(), atol=5e-3, rtol=0)
    moved = (local_head.weight - _toy()[0].weight).abs().max().item()
    assert moved > 0.05


def _cpu_fp16() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu" and bool(get_accelerator().is_fp16_supported())


CPU_FP16 = Precision(torch.float16, "cpu")


@pytest.mark.parametrize(
    ("stage", "precision"),
    [
        (0, FP32),
        (2, BF16),
        pytest.param(
            1, CPU_FP16, marks=pytest.mark.skipif(not _cpu_fp16(), reason="DeepSpeed has no fp16 on this CPU")
        ),  # ZeRO 1: fp16 under ZeRO 0 is refused (test_fp16_with_zero_stage_0_is_refused)
    ],
    ids=["z0-fp32", "z2-bf16", "z1-fp16"],
)
def test_channels_last_conv_part_trains_with_contiguous_weights(one_rank, stage, precision) -> None:
    """A trainable conv part laid out channels_last (train.py's default), with BatchNorm: DeepSpeed broadcasts and
    (ZeRO 2, bf16) flattens its parameters, which needs the row-major layout, so wrap() gives the same parameter
    objects that layout, the 1x1 conv included (is_contiguous() passes it with stride(-1) = in_channels). The
    activations stay channels_last, the BatchNorm statistics follow the module's dtype, and it trains."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).to(memory_format=torch.channels_last)
    assert net[3].weight.stride(-1) == 16 and net[3].weight.is_contiguous()  # the layout that passes is_contiguous()
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    backend = _backend(_cfg(data__batch_size=4, parallel__zero_stage=stage), one_rank, precision)
    engine = backend.wrap(net, _optimizer(net, _cfg(optim__lr=0.1).optim))
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    for p in params:
        assert p.is_contiguous() and p.stride()[-1] == 1, p.shape
    dtype = None if precision is FP32 else precision.dtype
    assert backend.input_dtype == dtype
    assert net[1].running_mean.dtype == (dtype or torch.float32)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    x = x if dtype is None else x.to(dtype)  # train.py's cast at the boundary
    assert net[0](x).is_contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        backend.backward(F.cross_entropy(engine(x).float(), y))
        assert backend.step(True)
    assert all(not torch.equal(p.detach().float(), b.float()) for p, b in zip(params, before))


def test_fp16_without_deepspeed_fp16_support_is_a_config_error(one_rank, monkeypatch) -> None:
    """DeepSpeed's own refusal is a bare ValueError inside initialize; fastft names the setting first."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    head, _ = _toy()
    backend = _backend(_cfg(data__batch_size=4, parallel__zero_stage=1), one_rank, CPU_FP16)
    with pytest.raises(ConfigError, match=r"^precision\.dtype: DeepSpeed has no fp16 support on this cpu device"):
        backend.wrap(head, _optimizer(head, _cfg().optim))


def test_step_refuses_a_boundary_deepspeed_does_not_see(one_rank) -> None:
    head, data = _toy()
    backend = _backend(_cfg(data__batch_size=4, optim__grad_accum=2), one_rank, FP32)
    model = backend.wrap(head, _optimizer(head, _cfg().optim))
    x, y = data[0]
    backend.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="accumulation boundary"):
        backend.step(True)  # micro-step 0 of 2 is not a boundary


@pytest.mark.parametrize(("stage", "precision"), [(0, FP32), (1, FP32), (2, BF16)])
def test_non_finite_gradients_are_reported_before_any_save(one_rank, stage, precision) -> None:
    """The loop checks grads_finite() before every checkpoint: a step on a non-finite gradient must flip it (ZeRO 0
    in fp32 steps plain torch; ZeRO 1/2 and bf16 find the overflow and skip), and not count as an fp16 skip."""
    head, data = _toy()
    backend = _backend(_cfg(data__batch_size=4, parallel__zero_stage=stage), one_rank, precision)
    model = backend.wrap(head, _optimizer(head, _cfg().optim))
    dtype = backend.input_dtype or torch.float32
    x, y = data[0]
    backend.backward(F.cross_entropy(model(x.to(dtype)).float(), y))
    backend.step(True)
    assert backend.grads_finite()  # a finite step leaves the flag clear
    x, y = data[1]
    x = x.clone()
    x[0, 0] = float("nan")
    backend.backward(F.cross_entropy(model(x.to(dtype)).float(), y))
    backend.step(True)
    assert not backend.grads_finite()
    assert backend.skipped_steps == 0
    x, y = data[2]
    backend.backward(F.cross_entropy(model(x.to(dtype)).float(), y))
    backend.step(True)
    assert not backend.grads_finite(), "the flag holds until the run stops: the last good checkpoint is kept"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def test_checkpoint_folders_resume_and_refusals(one_rank, tmp_path) -> None:
    """A folder per saved step, the previous one kept until the next save; the checkpoint file's tag selects the
    folder on load; a world-size change and a file carrying code are refused."""
    head, data = _toy()
    cfg = _cfg(data__batch_size=4, parallel__zero_stage=1)
    backend = _backend(cfg, one_rank, FP32)
    model = backend.wrap(head, _optimizer(head, cfg.optim))
    folders = []
    for x, y in data[:3]:
        backend.backward(F.cross_entropy(model(x), y))
        backend.step(True)
        backend.save_checkpoint(tmp_path, "last")
        backend.save_checkpoint(tmp_path, "last")  # same step again: nothing new is written
        folders.append(sorted(p.name for p in (tmp_path / "deepspeed").iterdir() if p.is_dir()))
    assert folders == [["last-step1"], ["last-step1", "last-step2"], ["last-step2", "last-step3"]]
    state = backend.state_dict()
    assert state["deepspeed_tag"] == "last-step3" and state["zero_stage"] == 1 and state["world_size"] == 1
    torch.save({"backend": state}, tmp_path / "last.pt")  # what train.py writes next to it
    saved = {k: v.detach().clone() for k, v in head.state_dict().items()}

    for x, y in data[3:5]:  # move on, then restore: weights and step counter come back
        backend.backward(F.cross_entropy(model(x), y))
        backend.step(True)
    backend.load_checkpoint(tmp_path, "last")
    assert backend.engine.global_steps == 3
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, saved[k], atol=0, rtol=0)

    # First save of a tag in this process: the folder its existing file names survives, an orphan does not.
    for orphan in ("best-step1", "best-step2"):
        (tmp_path / "deepspeed" / orphan).mkdir()
    torch.save({"backend": {**state, "deepspeed_tag": "best-step1"}}, tmp_path / "best.pt")
    backend.save_checkpoint(tmp_path, "best")
    assert sorted(p.name for p in (tmp_path / "deepspeed").glob("best-*")) == ["best-step1", "best-step3"]

    torch.save({"backend": {**state, "world_size": 2}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="same world size and stage"):
        backend.load_checkpoint(tmp_path, "last")
    torch.save({"backend": state}, tmp_path / "last.pt")

    _RunsCode.marker = tmp_path / "code-ran"
    shard = tmp_path / "deepspeed" / "last-step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(pickle.dumps({"optimizer_state_dict": _RunsCode()}, protocol=2))
    with pytest.raises(CheckpointError, match="could run code"):
        backend.load_checkpoint(tmp_path, "last")
    assert not _RunsCode.marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# Several processes under torchrun and the DeepSpeed launcher (gloo, 2 cores: OMP_NUM_THREADS=1 per process)

FAST = [
    "--model.weights=none",
    "--model.freeze=backbone",
    "--data.image_size=32",
    "--data.workers=0",
    "--precision.dtype=fp32",
    "--log.progress=false",
    "--log.tensorboard=false",
    "--run.device=cpu",
    "--compile.target=none",
    "--optim.epochs=1",
    "--optim.lr=0.05",
    "--optim.momentum=0.9",
]


def _ok(p) -> None:
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(shapes4, module_tmp):
    """Runs made once per module: single-process references (in this process) and DeepSpeed runs (torchrun)."""
    out = module_tmp("ds_runs")
    done: dict[str, Path] = {}

    def reference(global_batch: int) -> Path:
        name = f"single{global_batch}"
        if name not in done:
            from fastft.train import finetune

            finetune(
                tiny_config(
                    shapes4,
                    out,
                    run__name=name,
                    data__batch_size=global_batch,
                    optim__epochs=1,
                    optim__lr=0.05,
                    log__tensorboard=False,
                    parallel__backend="none",
                )
            )
            done[name] = out / name
        return done[name]

    def deepspeed(nproc: int, stage: int, *extra: str) -> Path:
        name = f"ds{nproc}-z{stage}" + "".join(e.replace("--", "-").replace("=", "") for e in extra)
        if name not in done:
            _ok(
                run_torchrun(
                    nproc,
                    "train",
                    f"--data.root={shapes4}",
                    *FAST,
                    "--parallel.backend=deepspeed",
                    f"--parallel.zero_stage={stage}",
                    f"--run.out_dir={out}",
                    f"--run.name={name}",
                    *extra,
                )
            )
            done[name] = out / name
        return done[name]

    reference.deepspeed = deepspeed
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_match_single_process_on_same_global_batch(runs, stage) -> None:
    """2 ranks x batch 4 under DeepSpeed ZeRO 0/1/2 == one process with batch 8 (same samples, same mean gradient)."""
    single = load_file(runs(8) / "head.safetensors")
    run = runs.deepspeed(2, stage, "--data.batch_size=4")
    diff = _max_diff(load_file(run / "head.safetensors"), single)
    assert diff < ATOL, f"ZeRO {stage}: max |head difference| {diff:.3g}"
    start = _events(run)[0]
    assert (start["world_size"], start["steps_per_epoch"], start["total_steps"]) == (2, 6, 6)
    shards = sorted(p.name for p in (run / "deepspeed" / "last-step6").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == (2 if stage else 0)  # ZeRO 1/2: optimizer state partitioned, one file per rank


@pytest.mark.slow
def test_three_ranks_with_accumulation_match_single_process(runs) -> None:
    """3 ranks x batch 2 x grad_accum 2 under ZeRO 2 == one process with batch 12: DeepSpeed's own 1/accum scaling
    and its accumulation boundary agree with fastft's."""
    single = load_file(runs(12) / "head.safetensors")
    run = runs.deepspeed(3, 2, "--data.batch_size=2", "--optim.grad_accum=2")
    diff = _max_diff(load_file(run / "head.safetensors"), single)
    assert diff < ATOL, f"3 ranks, ZeRO 2, accum 2: max |head difference| {diff:.3g}"
    assert _events(run)[0]["total_steps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_runs_save_and_export_the_fp32_master_weights(runs, stage) -> None:
    """DeepSpeed bf16 trains a bf16 copy of the head; checkpoints and exports hold its fp32 masters (ZeRO 0: kept
    whole by DeepSpeed's optimizer wrapper; ZeRO 1: assembled from the 2 ranks' partitions), which stay close to fp32
    training and carry more than bf16's 8 bits."""
    single = load_file(runs(8) / "head.safetensors")
    run = runs.deepspeed(2, stage, "--data.batch_size=4", "--precision.dtype=bf16")
    head = load_file(run / "head.safetensors")
    assert {v.dtype for v in head.values()} == {torch.float32}
    assert any((v != v.to(torch.bfloat16).float()).any() for v in head.values()), "exported a bf16-rounded head"
    assert _max_diff(head, single) < 2e-2  # bf16 autocast vs fp32: close, not equal
    saved = torch.load(run / "last.pt", weights_only=True)["model"]
    for k, v in head.items():
        assert torch.equal(saved[f"fc.{k}"], v), k
    model = load_file(run / "model.safetensors")
    assert {v.dtype for v in model.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_resume_after_killing_a_run_continues_from_the_saved_step(runs, shapes4, tmp_path) -> None:
    """Two ranks, ZeRO 1, last.pt every 2 steps. Reading one training image blocks (tests/parallel/_stall.py), so the
    run stops in step 5's batch right after saving step 4; the workers are then SIGKILLed. The resumed run starts at
    step 5 and ends with the head of an uninterrupted run."""
    from fastft.data.index import index_from_config
    from fastft.data.torch_loader import ShardedBatchSampler

    data = tmp_path / "data"
    shutil.copytree(shapes4, data)
    index = index_from_config(tiny_config(data, tmp_path).data, seed=0)
    sampler = ShardedBatchSampler(len(index.train), 8, train=True, seed=0)  # the global batches of epoch 0
    victim = Path(index.train[list(sampler)[4][0][0]][0])  # first read by the 5th step's batch

    run = tmp_path / "cut"
    args = [
        "train",
        f"--data.root={data}",
        *FAST,
        "--parallel.backend=deepspeed",
        "--parallel.zero_stage=1",
        "--data.batch_size=4",
        "--checkpoint.every_steps=2",
        "--log.every_steps=1",
        f"--run.out_dir={tmp_path}",
        "--run.name=cut",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "STALL_FILE": str(victim)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(REPO / "tests" / "parallel" / "_stall.py"),
        *args,
    ]
    with open(tmp_path / "cut.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "cut.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no step-4 checkpoint in time"
            if (run / "last.pt").is_file() and torch.load(run / "last.pt", weights_only=True)["step"] == 4:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None  # blocked on the stalled read: nothing after step 4 can happen
        workers = child_pids(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        for pid in [*workers, proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    saved = torch.load(run / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (4, 0, 4)
    assert saved["backend"]["deepspeed_tag"] == "last-step4" and (run / "deepspeed" / "last-step4").is_dir()

    _ok(run_torchrun(2, *args, f"--resume={run / 'last.pt'}"))
    events = _events(run)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    assert len(starts) == 2 and events[starts[1]]["resumed_from"] == str(run / "last.pt")
    resumed_steps = [e["step"] for e in events[starts[1] :] if e["event"] == "step"]
    assert resumed_steps == [5, 6]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 6
    uninterrupted = load_file(runs.deepspeed(2, 1, "--data.batch_size=4") / "head.safetensors")
    diff = _max_diff(load_file(run / "head.safetensors"), uninterrupted)
    assert diff < ATOL, f"resumed vs uninterrupted: max |head difference| {diff:.3g}"


@pytest.mark.slow
def test_launcher_script_runs_two_processes_like_torchrun(runs, shapes4, tmp_path) -> None:
    """launchers/deepspeed.sh (the `deepspeed` launcher, --num_gpus 2 on CPU) trains as torchrun does."""
    p = run_deepspeed_launcher(
        f"--data.root={shapes4}",
        *FAST,
        "--parallel.zero_stage=1",
        "--data.batch_size=4",
        f"--run.out_dir={tmp_path}",
        "--run.name=launched",
        timeout=600,
    )
    _ok(p)
    run = tmp_path / "launched"
    assert _events(run)[0]["world_size"] == 2
    torchrun_head = load_file(runs.deepspeed(2, 1, "--data.batch_size=4") / "head.safetensors")
    diff = _max_diff(load_file(run / "head.safetensors"), torchrun_head)
    assert diff < ATOL, f"deepspeed launcher vs torchrun: max |head difference| {diff:.3g}"
