"""Shared fixtures: small generated image folders and fast configs (resnet18 at 32 px, fp32, no network)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _seed(name: str) -> None:
    import torch

    torch.manual_seed(zlib.crc32(name.encode()))


@pytest.fixture(scope="module", autouse=True)
def _seeded_module(request):
    """torch seeds its default generator at random in each process (2.14), so a model or tensor a test draws from it
    would differ from run to run, and a failure would not reproduce: each module, then each test (below), starts from
    a seed of its own name, whatever ran before it."""
    _seed(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seeded_test(request):
    _seed(request.node.nodeid)


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """mktemp for a module's shared runs. Their checkpoints are tens of MB each, so the folders go when the module's
    tests are done (kept if one of them failed), as each test's own tmp_path does (tmp_path_retention_policy)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes4(tmp_path_factory) -> Path:
    """4 classes x (12 train + 6 val) JPEGs of 32 px."""
    from fastft.data.synthetic import make_image_folder

    return make_image_folder(
        tmp_path_factory.mktemp("shapes4"), num_classes=4, train_per_class=12, val_per_class=6, image_size=32, seed=1
    )


@pytest.fixture(scope="session")
def shapes2(tmp_path_factory) -> Path:
    """A binary task: 2 classes x (16 train + 8 val)."""
    from fastft.data.synthetic import make_image_folder

    return make_image_folder(
        tmp_path_factory.mktemp("shapes2"), num_classes=2, train_per_class=16, val_per_class=8, image_size=32, seed=2
    )


def tiny_config(root: Path, out: Path, **sections):
    """A fast deterministic config; `sections` maps "section.key" (with __ for .) to values."""
    from fastft.config import FinetuneConfig

    cfg = FinetuneConfig()
    cfg.model.name, cfg.model.weights = "resnet18", "none"
    cfg.data.root, cfg.data.image_size, cfg.data.batch_size, cfg.data.workers = str(root), 32, 8, 0
    cfg.precision.dtype = "fp32"
    cfg.compile.target = "none"
    cfg.optim.epochs, cfg.optim.lr = 2, 0.01
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), "t", "cpu"
    cfg.log.progress = False
    for key, value in sections.items():
        section, field = key.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg.validate()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None):
    """Run `python -m fastft ...` in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fastft", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int | None = None) -> list[int]:
    """Live (not zombie) child processes of `pid` (default: this process), read from /proc."""
    pid = os.getpid() if pid is None else pid
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def torchrun_cmd(nproc: int, *target: str) -> list[str]:
    """`torchrun --nproc_per_node N <target...>` on a free local port (target: `-m fastft ...` or a script)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *target,
    ]


def _dist_env(env: dict | None) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}


def run_torchrun(nproc: int, *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None):
    """`torchrun --nproc_per_node N -m fastft ...` on CPU (gloo)."""
    return subprocess.run(
        torchrun_cmd(nproc, "-m", "fastft", *args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_dist_env(env),
    )


def run_torchrun_script(nproc: int, script: Path, *args: str, timeout: int = 600, env: dict | None = None):
    """torchrun a script (instead of -m fastft), e.g. the fault-injection wrapper."""
    return subprocess.run(
        torchrun_cmd(nproc, str(script), *args), capture_output=True, text=True, timeout=timeout, env=_dist_env(env)
    )


def run_deepspeed_launcher(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`launchers/deepspeed.sh` with 2 processes on CPU (skips where the `deepspeed` launcher is not installed)."""
    runner = Path(sys.executable).parent / "deepspeed"
    if not runner.is_file():
        pytest.skip(f"no `deepspeed` launcher next to {sys.executable}")
    env = {**_dist_env(None), "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "DEEPSPEED": str(runner)}
    cmd = ["bash", str(REPO / "launchers" / "deepspeed.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu`-marked tests skip, saying why, where no CUDA device is visible (DALI and DeepSpeed run on CPU here)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Interrupted(Exception):
    """Raised by run_interrupted's backend step: the run stops as a crash would, after its last save."""


def run_interrupted(cfg, monkeypatch, *, at_step: int) -> None:
    """Run `cfg` in-process until the backend's `at_step`-th step call raises Interrupted (a crash mid-run: what was
    saved before stays), then put the real step back."""
    import pytest

    from fastft.parallel.backend import LocalBackend
    from fastft.train import finetune

    real_step, calls = LocalBackend.step, {"n": 0}

    def flaky_step(self, boundary=True):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise Interrupted
        return real_step(self, boundary)

    monkeypatch.setattr(LocalBackend, "step", flaky_step)
    with pytest.raises(Interrupted):
        finetune(cfg)
    monkeypatch.setattr(LocalBackend, "step", real_step)
