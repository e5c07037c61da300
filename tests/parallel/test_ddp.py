"""Multi-process DDP on CPU (gloo) under torchrun: equivalence with one process, exact distributed evaluation,
resume, launcher script, and failure of one rank ending the job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, run_cli, run_torchrun, run_torchrun_script
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

FAST = [
    "--model.weights=none",
    "--data.image_size=32",
    "--data.workers=0",
    "--precision.dtype=fp32",
    "--log.progress=false",
    "--run.device=cpu",
    "--compile.target=none",
    "--optim.lr=0.05",
    "--run.seed=7",
]
INJECT = Path(__file__).with_name("_inject.py")
PROBE = Path(__file__).with_name("_dropout_probe.py")


LAUNCHER = REPO / "launchers" / "torchrun.sh"


def _launcher_env(**settings: str) -> dict[str, str]:
    """The environment launchers/torchrun.sh reads (NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_*), on CPU."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **settings}


def _ok(p) -> None:
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-4000:])


def _head(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "head.safetensors")


TIMM_CACHED = ["--model.source=timm", "--model.name=resnet10t", "--data.augment=false"]


@pytest.mark.parametrize(("world", "extra"), [(2, []), (3, TIMM_CACHED)], ids=["2", "3-timm-cached"])
def test_ddp_matches_single_process_on_same_global_batch(shapes4, tmp_path, world, extra) -> None:
    """world x batch 4 under DDP == one process with batch 4*world: the same samples, the same mean gradient. With 3
    ranks: a timm model whose ranks train from the feature cache (each rank computes its shard of the table), against
    one process without a cache."""
    if extra:
        pytest.importorskip("timm", reason="timm is not installed (pip install 'fastft[timm]')")
    common = [
        f"--data.root={shapes4}",
        *FAST,
        "--optim.epochs=2",
        "--model.freeze=backbone",
        "--model.head_hidden=16",
        f"--run.out_dir={tmp_path}",
        *extra,
    ]
    cache = ["--features.cache=memory", "--features.dtype=fp32"] if extra else []
    _ok(run_cli("train", *common, f"--data.batch_size={4 * world}", "--run.name=single", "--parallel.backend=none"))
    _ok(run_torchrun(world, "train", *common, *cache, "--data.batch_size=4", "--run.name=ddp"))
    single, ddp = _head(tmp_path / "single"), _head(tmp_path / "ddp")
    events = [json.loads(x) for x in (tmp_path / "ddp" / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == world
    assert events[0]["steps_per_epoch"] == 48 // (4 * world)
    for k in single:
        # fp32; only the all-reduce summation order differs
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def eval_setup(shapes4, module_tmp):
    """A trained checkpoint and a folder of 97 images (uneven over 3 ranks, a short last batch at batch 8)."""
    base = module_tmp("evalsets")
    p = run_cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.batch_size=8",
        "--optim.epochs=1",
        f"--run.out_dir={base}",
        "--run.name=m",
    )
    _ok(p)
    from fastft.data.synthetic import make_image_folder

    big = make_image_folder(
        base / "pool", num_classes=4, train_per_class=26, val_per_class=0, image_size=32, seed=5, layout="flat"
    )
    sets = {}
    for n in (97,):
        dst = base / f"set{n}"
        files = sorted(f for f in big.rglob("*.jpg"))[:n]
        for f in files:
            (dst / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dst / f.parent.name / f.name)
        sets[n] = dst
    return base / "m" / "last.pt", sets


@pytest.mark.parametrize("n", [97])
def test_distributed_eval_equals_single_process_exactly(eval_setup, tmp_path, n) -> None:
    ckpt, sets = eval_setup
    args = [
        "eval",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(sets[n]),
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    ]
    _ok(run_cli(*args, "--out", str(tmp_path / "w1")))
    ref = json.loads((tmp_path / "w1" / "metrics.json").read_text())
    assert ref["num_samples"] == n
    for world in (3,):  # 97 images: shards of 33, 32 and 32
        _ok(run_torchrun(world, *args, "--out", str(tmp_path / f"w{world}")))
        got = json.loads((tmp_path / f"w{world}" / "metrics.json").read_text())
        assert got["num_samples"] == n  # every image once: no sampler padding duplicates
        assert got["confusion_matrix"] == ref["confusion_matrix"]
        assert [r["support"] for r in got["per_class"]] == [r["support"] for r in ref["per_class"]]
        for k, v in ref.items():
            if isinstance(v, float):
                assert got[k] == pytest.approx(v, abs=1e-6), (world, k)


def test_one_rank_failing_ends_the_job(shapes4, tmp_path) -> None:
    t0 = time.monotonic()
    p = run_torchrun_script(
        2,
        INJECT,
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.batch_size=4",
        "--optim.epochs=3",
        "--parallel.timeout_s=60",
        f"--run.out_dir={tmp_path}",
        env={"FAIL_STEP": "2", "FAIL_RANK": "1"},
        timeout=180,
    )
    assert p.returncode != 0
    assert time.monotonic() - t0 < 120  # well within the collective timeout: no hang
    assert "fastft: rank 1 failed: RuntimeError: injected fault at step 2" in p.stderr


def test_torchrun_launcher_two_nodes_on_one_host(shapes4, tmp_path) -> None:
    """The multi-node form of launchers/torchrun.sh (NNODES=2, NODE_RANK=0|1, one process per node, a shared run
    folder) trains exactly like one process with the two nodes' batches together."""
    from conftest import free_port

    common = [
        f"--data.root={shapes4}",
        *FAST,
        "--optim.epochs=1",
        "--model.freeze=backbone",
        f"--run.out_dir={tmp_path}",
    ]
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        env = _launcher_env(
            NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        cmd = ["bash", str(LAUNCHER), *common, "--data.batch_size=4", "--run.name=nodes"]
        nodes.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in nodes:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (out[-2000:], err[-4000:])
    _ok(run_cli("train", *common, "--data.batch_size=8", "--run.name=single", "--parallel.backend=none"))
    events = [json.loads(x) for x in (tmp_path / "nodes" / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2
    single, nodes_head = _head(tmp_path / "single"), _head(tmp_path / "nodes")
    for k in single:
        torch.testing.assert_close(nodes_head[k], single[k], atol=1e-5, rtol=1e-4, msg=k)


def test_ddp_cached_sweep_equals_single_process_uncached(shapes4, tmp_path) -> None:
    """Feature cache (each rank computes its shard, one shared table) + a 2-head sweep under 2 DDP ranks trains the same
    heads as one uncached process on the same global batch."""
    common = [
        f"--data.root={shapes4}",
        *FAST,
        "--optim.epochs=2",
        "--model.freeze=backbone",
        "--data.augment=false",
        "--head.sweep_lr=[0.01, 0.1]",
        f"--run.out_dir={tmp_path}",
    ]
    _ok(run_cli("train", *common, "--data.batch_size=8", "--run.name=single", "--parallel.backend=none"))
    _ok(
        run_torchrun(
            2,
            "train",
            *common,
            "--data.batch_size=4",
            "--run.name=ddp",
            "--features.cache=disk",
            "--features.dtype=fp32",
            f"--features.dir={tmp_path / 'cache'}",
        )
    )
    assert len(list((tmp_path / "cache").glob("*/table.npy"))) == 2  # train and val: one table each, all ranks
    a = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["sweep_bank"]
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["sweep_bank"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_ddp_gradual_unfreeze_with_cache(shapes4, tmp_path) -> None:
    p = run_torchrun(
        2,
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.batch_size=4",
        "--optim.epochs=2",
        "--model.freeze=backbone",
        "--features.cache=memory",
        '--optim.unfreeze=["2:layer4:0.1"]',
        f"--run.out_dir={tmp_path}",
        "--run.name=u",
    )
    _ok(p)
    events = [json.loads(x) for x in (tmp_path / "u" / "events.jsonl").read_text().splitlines()]
    assert [e["module"] for e in events if e["event"] == "unfreeze"] == ["layer4"]
    saved = torch.load(tmp_path / "u" / "last.pt", weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    assert any(g["name"].startswith("layer4:") for g in groups)


@pytest.mark.parametrize("world", [3])  # odd: 48 images, 4 steps of 3 x 4; 24 val images, 8 per rank
def test_run_report_describes_the_saved_model_with_trainable_batchnorm(shapes4, tmp_path, world) -> None:
    """Trainable BatchNorm under DDP: each rank's last forward updates its own running statistics. The run's final
    report must still be the evaluation of exactly the model in its checkpoint (ranks hold identical weights and
    buffers before every evaluation and save). Tolerance: top-1 and the confusion matrix exact; the loss to 1e-6
    (the distributed mean sums per-rank partial sums in another order than one process)."""
    run = tmp_path / "r"
    p = run_torchrun(
        world,
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--model.freeze=until:layer3",
        "--data.batch_size=4",
        "--optim.epochs=1",
        f"--run.out_dir={tmp_path}",
        "--run.name=r",
    )
    _ok(p)
    assert "parallel.sync_bn=auto: not converted: SyncBatchNorm needs a GPU" in p.stderr  # CPU: per-rank statistics
    reported = json.loads((run / "metrics.json").read_text())
    args = ["--data", str(shapes4 / "val"), "--batch-size", "8", "--workers", "0", "--precision", "fp32"]
    _ok(run_cli("eval", "--checkpoint", str(run / "best.pt"), *args, "--device", "cpu", "--out", str(tmp_path / "e")))
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved["num_samples"] == reported["num_samples"] == 24
    assert saved["confusion_matrix"] == reported["confusion_matrix"]
    assert saved["top1"] == reported["top1"]
    assert saved["loss"] == pytest.approx(reported["loss"], abs=1e-6)


def test_each_rank_draws_its_own_dropout_masks(shapes4, tmp_path) -> None:
    """Dropout (and stochastic depth) must not repeat one mask on every rank: each rank seeds its own stream once the
    model is built and wrapped (the run above checks the heads still start and stay identical)."""
    p = run_torchrun_script(
        2,
        PROBE,
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.batch_size=4",
        "--optim.max_steps=1",
        "--model.freeze=backbone",
        "--model.head_hidden=64",
        "--model.head_dropout=0.5",
        f"--run.out_dir={tmp_path}",
        "--run.name=d",
        env={"PROBE_DIR": str(tmp_path)},
    )
    _ok(p)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]["mask"]) == len(seen[1]["mask"]) == 4 * 64
    assert all(0.3 < s["dropped_fraction"] < 0.7 for s in seen)  # it is the training-mode dropout (p=0.5)
    assert seen[0]["mask"] != seen[1]["mask"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (SyncBatchNorm synchronises GPU tensors)")
def test_sync_batchnorm_ddp_matches_single_process_on_same_global_batch(shapes4, tmp_path) -> None:
    """Trainable BatchNorm with parallel.sync_bn=on: 2 ranks x batch 4 normalise over the global batch of 8, as one
    process with batch 8 does. fp32 (cuDNN may use TF32 convolutions); tolerance: that and the reduction order
    (atol 1e-3, rtol 1e-2 after 12 steps)."""
    common = [
        f"--data.root={shapes4}",
        *[a for a in FAST if a != "--run.device=cpu"],
        "--run.device=cuda",
        "--run.deterministic=true",
        "--optim.epochs=2",
        "--model.freeze=until:layer3",
        f"--run.out_dir={tmp_path}",
    ]
    _ok(run_cli("train", *common, "--data.batch_size=8", "--run.name=single", "--parallel.backend=none"))
    p = run_torchrun(2, "train", *common, "--data.batch_size=4", "--run.name=ddp", "--parallel.sync_bn=on")
    _ok(p)
    assert "SyncBatchNorm in the trainable part" in p.stderr
    single = load_file(tmp_path / "single" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    for k in single:
        if k.startswith(("layer4", "fc")) and not k.endswith("num_batches_tracked"):
            torch.testing.assert_close(ddp[k], single[k], atol=1e-3, rtol=1e-2, msg=k)


FAIL_ONCE = """import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    from fastft.parallel.backend import LocalBackend

    _step, _calls = LocalBackend.step, {"n": 0}

    def _faulty(self, boundary=True):
        _calls["n"] += boundary
        if boundary and _calls["n"] == int(os.environ["FAIL_STEP"]) and os.environ["RANK"] == "1":
            raise RuntimeError("injected fault on the first attempt")
        return _step(self, boundary)

    LocalBackend.step = _faulty
"""


def test_torchrun_launcher_restarts_a_failed_worker_and_resumes(shapes4, tmp_path) -> None:
    """launchers/torchrun.sh with --max-restarts: rank 1 fails at step 4 of the first attempt; torchrun restarts the
    workers, and the same arguments (--resume=auto, no run.name) continue from the step-2 checkpoint to the end."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAIL_ONCE)
    env = _launcher_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), MAX_RESTARTS="1", FAIL_STEP="4")
    env["PYTHONPATH"] = f"{site}:{REPO}"
    args = [f"--data.root={shapes4}", *FAST, "--data.batch_size=4", "--optim.epochs=2"]
    args += ["--checkpoint.every_steps=2", "--log.every_steps=1", f"--run.out_dir={tmp_path / 'runs'}", "--resume=auto"]
    p = subprocess.run(["bash", str(LAUNCHER), *args], capture_output=True, text=True, env=env, timeout=600)
    _ok(p)
    assert "injected fault on the first attempt" in p.stderr
    (run,) = (tmp_path / "runs").iterdir()
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    assert len(starts) == 2 and events[starts[1]]["resumed_from"] == str(run / "last.pt")
    after = [e["step"] for e in events[starts[1] :] if e["event"] == "step"]
    assert after[0] == 3 and events[-1]["event"] == "end" and events[-1]["step"] == 12
