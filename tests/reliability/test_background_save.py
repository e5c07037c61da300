"""Checkpoint writes off the training path: the file holds the state at the save although training goes on, one write
is in flight, the run's end, a stop signal and process exit wait for it, and a failed write is a one-line error that
keeps the previous file. The step path: a fused optimizer step that resumes bit for bit, and no extra pass over the
gradients when clipping is off (non-finite weights are refused at the save instead)."""

from __future__ import annotations

import copy
import errno
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _reliability import FAST, cli, error_line, events, mentions
from torch import nn

import fastft.checkpoint as ck_mod
import fastft.losses
import fastft.trainer
from fastft import resume
from fastft.checkpoint import Checkpointer, load_checkpoint
from fastft.config import OptimConfig
from fastft.errors import CheckpointError, FastftError
from fastft.optim import Schedule, build_optimizer
from fastft.parallel.backend import LocalBackend
from fastft.parallel.env import DistEnv

WRITER = "fastft-checkpoint-write"


def _parts(tmp_path: Path, *, optim: str = "adamw", clip: float = 0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).train()
    cfg = OptimConfig(name=optim, lr=0.05)
    group = {"params": list(model.parameters()), "lr_scale": 1.0, "weight_decay": 0.0}
    opt = build_optimizer([group], cfg, device=torch.device("cpu"))
    backend = LocalBackend(clip_grad_norm=clip)
    backend.wrap(model, opt)
    sched = Schedule(opt, cfg, total_steps=100)
    ck = Checkpointer(
        tmp_path, env=DistEnv(), model=model, backend=backend, optimizer=opt, scheduler=sched, meta={"config": {}}
    )
    return model, backend, ck


def _train(model, backend, steps: int, *, poison: bool = False) -> None:
    for _ in range(steps):
        out = model(torch.randn(16, 8))
        if poison:  # finite loss, infinite gradient
            out.register_hook(lambda g: g * float("inf"))
        backend.backward(F.cross_entropy(out, torch.randint(0, 3, (16,))))
        backend.step(True)


def _save(ck: Checkpointer, step: int) -> None:
    ck.save("last.pt", epoch=0, batch=step, step=step, best={}, stats={"loss_sum": 1.0, "loss_n": 1, "seen": 16})


class _Gate:
    """atomic_save held until `open` is set; records which file each write started and on which thread."""

    def __init__(self, monkeypatch) -> None:
        self.open = threading.Event()
        self.started: list[tuple[str, str]] = []
        real = ck_mod.atomic_save

        def gated(obj, path):
            self.started.append((Path(path).name, threading.current_thread().name))
            self.open.wait(10)
            real(obj, path)

        monkeypatch.setattr(ck_mod, "atomic_save", gated)


def test_the_file_holds_the_state_at_the_save_while_training_goes_on(tmp_path, monkeypatch) -> None:
    model, backend, ck = _parts(tmp_path)
    _train(model, backend, 2)
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {i: s["exp_avg"].clone() for i, s in ck.optimizer.state_dict()["state"].items()}
    gate = _Gate(monkeypatch)
    _save(ck, 2)
    assert not (tmp_path / "last.pt").exists()  # save() returned before the write: it is in the background
    _train(model, backend, 3)  # changes the parameters, BatchNorm statistics and moments in place
    gate.open.set()
    ck.wait()
    saved = load_checkpoint(tmp_path / "last.pt")
    assert gate.started == [("last.pt", WRITER)]
    for k, v in at_save.items():
        assert torch.equal(saved["model"][k], v), k
    assert all(torch.equal(saved["optimizer"]["state"][i]["exp_avg"], m) for i, m in moments.items())
    assert not torch.equal(model[2].weight, at_save["2.weight"])  # training did go on


def test_a_second_save_waits_for_the_first_write(tmp_path, monkeypatch) -> None:
    model, backend, ck = _parts(tmp_path)
    _train(model, backend, 1)
    gate = _Gate(monkeypatch)
    t0 = time.perf_counter()
    _save(ck, 1)
    assert time.perf_counter() - t0 < 5  # not held by the gated write
    _train(model, backend, 1)
    second = threading.Thread(target=_save, args=(ck, 2))
    second.start()
    second.join(0.5)
    assert second.is_alive() and gate.started == [("last.pt", WRITER)]  # waiting; its write has not begun
    gate.open.set()
    second.join(10)
    ck.wait()
    assert gate.started == [("last.pt", WRITER)] * 2
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_a_failed_write_is_one_line_at_the_next_save_and_at_the_end_and_keeps_the_previous_file(
    tmp_path, monkeypatch
) -> None:
    model, backend, ck = _parts(tmp_path)
    _train(model, backend, 1)
    _save(ck, 1)
    ck.wait()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck_mod.torch, "save", disk_full)
    _train(model, backend, 1)
    _save(ck, 2)  # returns: the write fails in the background
    with pytest.raises(CheckpointError) as err:
        _save(ck, 3)
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "last.pt") in text and "No space left on device" in text, text
    _save(ck, 4)  # the failure was reported once; this one fails too, reported when the run ends
    with pytest.raises(CheckpointError, match="No space left on device"):
        ck.close()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_process_exit_finishes_the_write_in_flight(tmp_path) -> None:
    target = tmp_path / "last.pt"
    code = (
        "import sys, time, torch\n"
        "from pathlib import Path\n"
        "from fastft.checkpoint import atomic_save\n"
        "from fastft.saver import Writer\n"
        "p = Path(sys.argv[1])\n"
        "def write():\n"
        "    time.sleep(1.0)\n"
        "    atomic_save({'model': {'w': torch.ones(3)}, 'meta': {}}, p)\n"
        "Writer().submit(p, write)\n"  # the script ends at once, the write still in flight
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert torch.equal(load_checkpoint(target)["model"]["w"], torch.ones(3))


def _slow_writes(monkeypatch) -> tuple[list[tuple[str, int, str]], threading.Event]:
    """atomic_save takes 0.3 s longer; best.pt, the run's last write, goes on past the exports, until `ended` is set
    (2 s at most: the run's end waits for it, so only the timeout lets it finish). Returns ((file, step, thread) per
    finished write, ended)."""
    done: list[tuple[str, int, str]] = []
    real, real_export = ck_mod.atomic_save, fastft.trainer._export
    exporting, ended = threading.Event(), threading.Event()
    monkeypatch.setattr(fastft.trainer, "_export", lambda *a: (exporting.set(), real_export(*a))[1])

    def slow(obj, path):
        if Path(path).name == "best.pt":
            exporting.wait(30)
            ended.wait(2.0)
        time.sleep(0.3)
        real(obj, path)
        done.append((Path(path).name, obj["step"], threading.current_thread().name))

    monkeypatch.setattr(ck_mod, "atomic_save", slow)
    return done, ended


def _train_cli(shapes4, out, *extra: str) -> tuple[int, str]:
    # 48 images / batch 8 = 6 steps, one epoch
    return cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=8",
        "--optim.epochs=1",
        "--model.freeze=until:layer4",
        f"--run.out_dir={out}",
        "--run.name=r",
        *extra,
    )


def test_the_run_end_and_a_stop_signal_wait_for_the_write_in_flight(shapes4, tmp_path, monkeypatch) -> None:
    done, ended = _slow_writes(monkeypatch)
    at_end: list[list] = []
    real_log_end = fastft.trainer._log_end

    def log_end(run):
        at_end.append(list(done))
        ended.set()
        return real_log_end(run)

    monkeypatch.setattr(fastft.trainer, "_log_end", log_end)
    rc, err = _train_cli(shapes4, tmp_path / "end", "--checkpoint.every_steps=2")
    assert rc == 0, err[-2000:]
    # steps 2, 4, 6 and the end of the epoch; every write on the writer thread, all done before the run's end
    assert [(n, s) for n, s, _ in at_end[0]] == [("last.pt", 2), ("last.pt", 4), ("last.pt", 6), ("best.pt", 6)]
    assert {t for _, _, t in at_end[0]} == {WRITER}
    assert load_checkpoint(tmp_path / "end" / "r" / "last.pt")["step"] == 6

    # SIGTERM at step 3 (off the every_steps=2 cadence): last.pt at step 3 is on disk when the stop message is made
    done.clear()
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return F.cross_entropy(*args, **kwargs)

    monkeypatch.setattr(fastft.losses, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    on_disk: list[int] = []
    real_stopped = fastft.trainer._stopped

    def stopped(name, epoch, step, run_dir):
        on_disk.append(load_checkpoint(run_dir / "last.pt")["step"])
        return real_stopped(name, epoch, step, run_dir)

    monkeypatch.setattr(fastft.trainer, "_stopped", stopped)
    rc, err = _train_cli(shapes4, tmp_path / "stop", "--checkpoint.every_steps=2")
    run = tmp_path / "stop" / "r"
    assert rc == 2 and mentions(error_line(err), "stopped by SIGTERM", "step 3", str(run / "last.pt"))
    assert on_disk == [3] and [(n, s, t) for n, s, t in done] == [("last.pt", 2, WRITER), ("last.pt", 3, WRITER)]
    assert "end" not in [e["event"] for e in events(run)]


# --------------------------------------------------------------------------------------------------------------------
# The step path


def test_the_step_is_fused_on_the_cpu_and_resumes_bit_for_bit(tmp_path) -> None:
    model, backend, ck = _parts(tmp_path)
    assert all(g["fused"] for g in ck.optimizer.param_groups)
    torch.manual_seed(1)
    _train(model, backend, 2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(ck.optimizer.state_dict())  # state_dict() holds the live tensors
    torch.manual_seed(2)
    _train(model, backend, 2)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    # resumed: a fresh model and optimizer from the state after step 2
    model2, backend2, ck2 = _parts(tmp_path / "b")
    model2.load_state_dict(state)
    resume.load_optimizer_state(ck2.optimizer, opt_state)
    torch.manual_seed(2)
    _train(model2, backend2, 2)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in straight.items())

    # a state saved by the unfused step (checkpoints from before): this run's fused step is kept and runs
    plain = torch.optim.AdamW(model2.parameters(), lr=0.05)
    for p in model2.parameters():
        p.grad = torch.ones_like(p)
    plain.step()
    resume.load_optimizer_state(ck2.optimizer, plain.state_dict())
    assert all(g["fused"] for g in ck2.optimizer.param_groups)
    _train(model2, backend2, 1)


def test_without_clipping_no_gradient_norm_is_computed_and_a_bad_gradient_is_refused_at_the_save(
    tmp_path, monkeypatch
) -> None:
    norms = {"n": 0}
    real_norm = torch.nn.utils.get_total_norm

    def counted(*args, **kwargs):
        norms["n"] += 1
        return real_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted)
    for optim in ("sgd", "adamw"):
        model, backend, ck = _parts(tmp_path / optim, optim=optim)
        _train(model, backend, 2)
        _save(ck, 2)
        ck.wait()
        _train(model, backend, 1, poison=True)
        with pytest.raises(FastftError, match="a weight is not finite at epoch 1, step 3"):
            _save(ck, 3)
        ck.wait()
        assert load_checkpoint(tmp_path / optim / "last.pt")["step"] == 2, optim
    assert norms["n"] == 0  # no extra pass over the gradients at any step


def test_with_clipping_the_clip_norm_flags_a_bad_gradient(tmp_path) -> None:
    model, backend, ck = _parts(tmp_path, clip=1.0)
    _train(model, backend, 1)
    assert backend.grads_finite()
    _train(model, backend, 1, poison=True)
    assert not backend.grads_finite()
    with pytest.raises(FastftError, match="gradient norm is not finite"):
        _save(ck, 2)
    assert not (tmp_path / "last.pt").exists()
