"""Helpers shared by the reliability tests: the CLI in-process and in a killable child, run-folder readers, and one
small trained run reused by several modules (built once per session).

Not a conftest.py on purpose: tests/conftest.py is imported as the top-level module `conftest` (no __init__.py), and
a second conftest.py would shadow it for `from conftest import ...` in other test modules.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[2]

# resnet18 at 32 px from random weights, fp32, no compile, no TensorBoard: the fastest real runs (the freeze policy is
# chosen per test: until:layer3 where trainable BatchNorm and momentum state must be restored, backbone elsewhere).
FAST = [
    "--model.name=resnet18",
    "--model.weights=none",
    "--data.image_size=32",
    "--precision.dtype=fp32",
    "--log.progress=false",
    "--log.tensorboard=false",
    "--run.device=cpu",
    "--compile.target=none",
]


def child_env(**extra: str) -> dict[str, str]:
    # One intra-op thread per process: on a shared 2-core machine this is ~2x faster than oversubscribing, and every
    # run compared bit for bit must use the same thread count.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@contextlib.contextmanager
def one_thread():
    """torch intra-op threads = 1 for an in-process run (restored after): see child_env."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cli(*args: str) -> tuple[int, str]:
    """Run `fastft.cli.main(args)` in this process; returns (exit code, stderr + fastft log records).

    Same code path as `python -m fastft` minus interpreter start-up (seconds on a loaded machine). The console
    handler is replaced by a capture so no handler bound to a short-lived stream outlives the call."""
    from fastft.cli import main

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    logger = logging.getLogger("fastft")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with (
            mock.patch("fastft.logging.setup_console", lambda rank=0: None),
            contextlib.redirect_stderr(buf),
            contextlib.redirect_stdout(io.StringIO()),
            one_thread(),
        ):
            rc = main(list(args))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return rc, buf.getvalue()


def error_line(text: str) -> str:
    """The single `fastft: error...` line of a failed command (asserts there is exactly one, and no traceback)."""
    errors = [ln for ln in text.splitlines() if ln.startswith("fastft: error")]
    assert len(errors) == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return errors[0]


def mentions(line: str, *needles: str) -> bool:
    """True when the error line contains every needle (the facts it must state, whatever the wording)."""
    missing = [n for n in needles if n not in line]
    assert not missing, f"{missing} not in: {line}"
    return True


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --------------------------------------------------------------------------------------------------------------------
# Children that are killed with SIGKILL


def start_fastft(args: list[str], log: Path, *, nproc: int = 1) -> subprocess.Popen:
    """Start `python -m fastft ...` (or `torchrun --nproc_per_node N -m fastft ...`) in a new session."""
    if nproc > 1:
        from conftest import torchrun_cmd

        cmd = torchrun_cmd(nproc, "-m", "fastft", *args)
    else:
        cmd = [sys.executable, "-m", "fastft", *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group and the process group of every descendant.

    torchrun's workers are started with start_new_session=True (torch.distributed.elastic SubprocessHandler), so
    killing the launcher's group alone would orphan them and let them finish the run: each group is killed."""
    groups = [proc.pid]
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            groups.append(os.getpgid(pid))
    for pgid in dict.fromkeys(groups):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.05)
    assert not alive, f"processes survived SIGKILL: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_for_step(proc: subprocess.Popen, ckpt: Path, min_step: int, log: Path, timeout: float = 300) -> int:
    """Poll `ckpt` (written atomically, so any file found is complete) until its step >= min_step; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before step {min_step}:\n{log.read_text()[-3000:]}")
        if ckpt.is_file():
            try:
                step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["step"]
            except (OSError, RuntimeError, KeyError):
                step = -1  # replaced between is_file and open: try again
            if step >= min_step:
                return step
        time.sleep(0.05)
    kill_job(proc)
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout}s:\n{log.read_text()[-3000:]}")


# --------------------------------------------------------------------------------------------------------------------
# One small trained run (4 classes), shared by the modules that need a real checkpoint

_CACHE: dict[str, object] = {}


def trained_run(shapes4: Path, tmp_path_factory) -> dict:
    """Train resnet18 (until:layer3) on shapes4 once: 2 epochs x 6 steps, last.pt every 4 steps, every 2nd epoch.

    Returns {"result": RunResult, "saves": [(name, epoch, batch, step)] in save order}."""
    if "trained" not in _CACHE:
        from conftest import tiny_config

        from fastft import checkpoint as ckpt_io
        from fastft.train import finetune

        saves: list[tuple[str, int, int, int]] = []
        real_save, real_link = ckpt_io.atomic_save, ckpt_io.atomic_link
        written: dict[str, tuple[int, int, int]] = {}

        def recording_save(obj, path):
            written[Path(path).name] = (obj["epoch"], obj["batch"], obj["step"])
            saves.append((Path(path).name, *written[Path(path).name]))
            return real_save(obj, path)

        def recording_link(src, dst):  # the same state saved under a second name
            saves.append((Path(dst).name, *written[Path(src).name]))
            return real_link(src, dst)

        cfg = tiny_config(
            shapes4,
            tmp_path_factory.mktemp("trained"),
            run__name="r4",
            model__freeze="until:layer3",
            checkpoint__every_steps=4,
            checkpoint__every_epochs=2,
            log__tensorboard=False,
        )
        with (
            mock.patch.object(ckpt_io, "atomic_save", recording_save),
            mock.patch.object(ckpt_io, "atomic_link", recording_link),
            one_thread(),
        ):
            result = finetune(cfg)
        _CACHE["trained"] = {"result": result, "saves": saves}
    return _CACHE["trained"]  # type: ignore[return-value]
