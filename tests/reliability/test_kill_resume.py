"""Exact resume after SIGKILL: a real child (`python -m fastft train`, and a 2-process torchrun job) is killed
mid-epoch, restarted with `--resume`, and must end with the same weights and metrics as an uninterrupted run.

Deterministic CPU mode, fp32, one intra-op thread per process. Tolerance: none. Resume restores model, optimizer
(momentum), schedule, RNG (each rank's, which draws the head's dropout masks) and the batch position, and
augmentation is a function of (seed, epoch, sample), so the resumed run repeats exactly the arithmetic of the
uninterrupted one and the weights must be bit-identical. (Were a
kernel ever to pick another algorithm after a restart, the honest bound would be fp32 rounding, ~1e-6 relative; we
do not loosen to that unless it is shown to happen.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _reliability import FAST, descendants, events, kill_job, start_fastft, wait_for_step, wait_gone
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _common(root: Path, out: Path, *, batch: int, workers: int) -> list[str]:
    return [
        "train",
        f"--data.root={root}",
        *FAST,
        "--model.freeze=until:layer3",
        "--model.head_dropout=0.3",  # each rank's dropout stream is saved and restored
        f"--data.batch_size={batch}",
        f"--data.workers={workers}",
        "--run.deterministic=true",
        "--checkpoint.every_steps=1",
        "--optim.epochs=2",
        "--optim.warmup_steps=3",
        "--optim.lr=0.02",
        "--run.seed=3",
        f"--run.out_dir={out}",
    ]


def _run(args: list[str], log: Path, nproc: int) -> None:
    proc = start_fastft(args, log, nproc=nproc)
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise
    assert rc == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def reference(shapes4, module_tmp):
    """The uninterrupted run (batch 4, 2 epochs) every case of one world size is compared with, made once: the
    worker count and the checkpoint cadence do not change a run's arithmetic (so it saves at epoch ends only)."""
    made: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in made:
            out = module_tmp(f"reference-{nproc}")
            common = _common(shapes4, out, batch=4, workers=0)
            _run([*common, "--checkpoint.every_steps=0", "--run.name=full"], out / "full.log", nproc)
            made[nproc] = out / "full"
        return made[nproc]

    return get


def _kill_and_resume(
    root: Path,
    out: Path,
    *,
    full: Path,
    nproc: int,
    batch: int,
    workers: int,
    kill_at: int,
    steps_per_epoch: int,
    by_path: bool,
) -> dict:
    """Killed run, resumed run (`--resume auto`, or `--resume <path>` when by_path); returns what the tests compare
    with the reference run `full`."""
    common = _common(root, out, batch=batch, workers=workers)
    victim_log = out / "cut.log"
    victim = start_fastft([*common, "--run.name=cut"], victim_log, nproc=nproc)
    try:
        wait_for_step(victim, out / "cut" / "last.pt", kill_at, victim_log)
        pids = descendants(victim.pid)
        kill_job(victim)
        wait_gone(pids)
        assert victim.returncode == -9, victim_log.read_text()[-3000:]
    finally:
        if victim.poll() is None:  # never leave a child behind when something above failed
            kill_job(victim)
    killed = torch.load(out / "cut" / "last.pt", map_location="cpu", weights_only=True)
    resume = f"--resume={out / 'cut' / 'last.pt'}" if by_path else "--resume=auto"
    _run([*common, "--run.name=cut", resume], out / "resume.log", nproc)
    return {
        "out": out,
        "nproc": nproc,
        "steps_per_epoch": steps_per_epoch,
        "killed_at": {k: killed[k] for k in ("epoch", "batch", "step")},
        "killed_model": killed["model"],
        "killed_rng": len(killed["rng"]),
        "full": full,
        "cut": out / "cut",
        "resume_log": (out / "resume.log").read_text(),
    }


@pytest.fixture(scope="module")
def single(shapes4, module_tmp, reference) -> dict:
    # 48 images / batch 4 = 12 steps per epoch, 2 epochs; one DataLoader worker (killed with the group too).
    return _kill_and_resume(
        shapes4,
        module_tmp("kill1"),
        full=reference(1),
        nproc=1,
        batch=4,
        workers=1,
        kill_at=3,
        steps_per_epoch=12,
        by_path=False,
    )


@pytest.fixture(scope="module")
def ddp(shapes4, module_tmp, reference) -> dict:
    # 2 ranks x batch 4: 48 / 8 = 6 steps per epoch, 2 epochs; the launcher and both workers are killed; resumed
    # with an explicit checkpoint path.
    return _kill_and_resume(
        shapes4,
        module_tmp("kill2"),
        full=reference(2),
        nproc=2,
        batch=4,
        workers=0,
        kill_at=2,
        steps_per_epoch=6,
        by_path=True,
    )


CASES = ["single", "ddp"]


@pytest.fixture(params=CASES)
def case(request) -> dict:
    return request.getfixturevalue(request.param)


def test_the_kill_landed_mid_epoch(case) -> None:
    k = case["killed_at"]
    assert k["epoch"] == 0 and 0 < k["batch"] < case["steps_per_epoch"] and k["step"] == k["batch"], k
    assert case["killed_rng"] == case["nproc"]  # one RNG state per rank


def test_resumed_weights_equal_the_uninterrupted_run_bit_for_bit(case) -> None:
    full, resumed = load_file(case["full"] / "model.safetensors"), load_file(case["cut"] / "model.safetensors")
    assert set(full) == set(resumed)
    differ = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # and the resumed run did train: the weights moved on from those in the checkpoint it resumed from
    assert not torch.equal(resumed["fc.1.weight"], case["killed_model"]["fc.1.weight"])
    assert not torch.equal(resumed["layer4.1.bn2.running_mean"], case["killed_model"]["layer4.1.bn2.running_mean"])


def test_resumed_metrics_equal_the_uninterrupted_run(case) -> None:
    full = json.loads((case["full"] / "metrics.json").read_text())
    resumed = json.loads((case["cut"] / "metrics.json").read_text())
    assert resumed == full


def test_events_show_the_resume_and_no_step_is_repeated_or_skipped(case) -> None:
    ev = events(case["cut"])
    starts = [i for i, e in enumerate(ev) if e["event"] == "start"]
    assert len(starts) == 2 and ev[starts[0]]["resumed_from"] is None
    assert ev[starts[1]]["resumed_from"] == str(case["cut"] / "last.pt")
    resumed_line = f"resumed from {case['cut'] / 'last.pt'} at epoch 0, batch {case['killed_at']['batch']}"
    assert resumed_line in case["resume_log"]
    after = [e["step"] for e in ev[starts[1] :] if e["event"] == "step"]
    total = 2 * case["steps_per_epoch"]
    assert ev[starts[1]]["steps_per_epoch"] == case["steps_per_epoch"]
    assert after == list(range(case["killed_at"]["step"] + 1, total + 1))  # every_steps=1: one event per step
    assert ev[-1]["event"] == "end" and ev[-1]["step"] == total


@pytest.mark.parametrize("which", CASES)
def test_resumed_epoch_train_loss_equals_the_uninterrupted_run(request, which) -> None:
    c = request.getfixturevalue(which)
    ref = [e["train_loss"] for e in events(c["full"]) if e["event"] == "eval"]
    got = [e["train_loss"] for e in events(c["cut"]) if e["event"] == "eval"]
    assert got == pytest.approx(ref, rel=1e-6, abs=1e-7)


# --------------------------------------------------------------------------------------------------------------------
# A requeued job: the same command again (no run.name, resume=auto) finds its run; SIGTERM/SIGUSR1 save the position


def _wait_for_event_step(proc: subprocess.Popen, run_root: Path, min_step: int, log: Path, timeout: float = 300):
    """Poll the (only) run folder under run_root until its events show a step >= min_step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before step {min_step}:\n{log.read_text()[-3000:]}")
        for ev in run_root.glob("*/events.jsonl"):
            steps = [json.loads(x).get("step", 0) for x in ev.read_text().splitlines() if '"step"' in x]
            if steps and max(steps) >= min_step:
                return
        time.sleep(0.05)
    kill_job(proc)
    raise AssertionError(f"no step >= {min_step} within {timeout}s:\n{log.read_text()[-3000:]}")


def _requeue_case(root: Path, out: Path, *, full: Path, nproc: int, batch: int, stop: str) -> dict:
    """The same command (no run.name, --resume=auto) stopped mid-epoch by SIGTERM with no periodic saves, sent to the
    launched process or, "SIGTERM-rank1", to rank 1's worker alone, and run again unchanged."""
    # the only mid-epoch checkpoint is the one the signal asks for
    again = [*_common(root, out / "job", batch=batch, workers=0), "--resume=auto", "--checkpoint.every_steps=0"]
    first = start_fastft(again, out / "first.log", nproc=nproc)
    try:
        _wait_for_event_step(first, out / "job", 2, out / "first.log")
        if stop == "SIGTERM-rank1":  # one rank hears it: both must stop at the same step
            (worker,) = [p for p in descendants(first.pid) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
            os.kill(worker, signal.SIGTERM)
            first.wait(timeout=120)
        else:
            os.kill(first.pid, signal.SIGTERM)  # python, or torchrun, which passes SIGTERM on to its workers
            first.wait(timeout=120)
    finally:
        if first.poll() is None:
            kill_job(first)
    (run,) = (out / "job").iterdir()  # one folder, named from the config
    stopped = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    _run(again, out / "again.log", nproc)
    assert [p.name for p in (out / "job").iterdir()] == [run.name]
    return {
        "first_rc": first.returncode,
        "first_log": (out / "first.log").read_text(),
        "stopped_at": {k: stopped[k] for k in ("epoch", "batch", "step")},
        "run": run,
        "full": full,
        "again_log": (out / "again.log").read_text(),
    }


# SIGKILL of a requeued job is the `single` case above with the run's name left to the config: SIGTERM-1 covers that.
# On 2 ranks only one rank hears the signal, the harder case: both must stop at the same step.
STOPS = [("SIGTERM", 1), ("SIGTERM-rank1", 2)]


@pytest.fixture(scope="module", params=STOPS, ids=lambda p: f"{p[0]}-{p[1]}")
def requeued(request, shapes4, module_tmp, reference) -> dict:
    stop, nproc = request.param
    out = module_tmp(f"requeue-{stop}-{nproc}")
    case = _requeue_case(shapes4, out, full=reference(nproc), nproc=nproc, batch=4, stop=stop)
    return {**case, "stop": stop, "nproc": nproc, "steps_per_epoch": 12 // nproc}


def test_the_same_command_again_resumes_and_ends_with_the_uninterrupted_weights(requeued) -> None:
    c = requeued
    k = c["stopped_at"]  # mid-epoch (torchrun passes the signal on after its next poll: maybe a later epoch)
    assert k["epoch"] < 2 and 0 < k["batch"] < c["steps_per_epoch"], k
    assert k["step"] == k["epoch"] * c["steps_per_epoch"] + k["batch"], k
    assert f"resumed from {c['run'] / 'last.pt'} at epoch {k['epoch']}, batch {k['batch']}" in c["again_log"]
    full, resumed = load_file(c["full"] / "model.safetensors"), load_file(c["run"] / "model.safetensors")
    differ = [n for n in full if not torch.equal(full[n], resumed[n])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_sigterm_saves_the_step_boundary_and_ends_with_one_line(requeued) -> None:
    c = requeued
    # the run said where it stopped, and that position is the checkpoint's (no periodic saves were asked for)
    k = c["stopped_at"]
    at = f"at epoch {k['epoch'] + 1}, step {k['step']}: the position is saved in"
    if c["nproc"] == 1:
        log = c["first_log"]
        assert f"stopped by SIGTERM {at}" in log and "Traceback" not in log, log[-3000:]
    else:  # every rank stopped at the same step (torchrun itself reports the end of its workers with a traceback)
        for rank in range(c["nproc"]):
            heard = "SIGTERM" if c["stop"] == "SIGTERM" or rank == 1 else "a stop signal on another rank"
            assert f"fastft: error (rank {rank}): stopped by {heard} {at}" in c["first_log"], c["first_log"][-3000:]
    assert c["first_rc"] != 0
