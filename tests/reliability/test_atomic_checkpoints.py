"""Atomic checkpoints: a process SIGKILLed while writing a checkpoint leaves the previous one loadable at the final
path, never a partial file; the save cadence is configurable in steps and in epochs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from _reliability import child_env, trained_run

from fastft.checkpoint import load_checkpoint
from fastft.errors import CheckpointError

# Saves version 1, then starts saving version 2 with torch.save slowed down: half of the new file reaches the temp
# file, the child says so and sleeps, and is killed there (before the rename).
_MID_WRITE = r"""
import io, sys, time, torch
from pathlib import Path
from fastft import checkpoint as ck
path = Path(sys.argv[1])
def ckpt(v):
    return {"model": {"w": torch.full((1_000_000,), float(v))}, "meta": {"version": v}}
ck.atomic_save(ckpt(1), path)
real_save = torch.save
def half_then_hang(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: buf.tell() // 2])
    f.flush()
    print("MID-WRITE", flush=True)
    time.sleep(600)
torch.save = half_then_hang
ck.atomic_save(ckpt(2), path)
"""

# Saves ever newer versions of a 32 MB checkpoint as fast as it can, printing each finished version: a kill at any
# moment lands inside some save.
_LOOP = r"""
import sys, torch
from pathlib import Path
from fastft import checkpoint as ck
path = Path(sys.argv[1])
v = 0
while True:
    v += 1
    ck.atomic_save({"model": {"w": torch.full((8_000_000,), float(v))}, "meta": {"version": v}}, path)
    print(v, flush=True)
"""


def _child(code: str, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_in_the_middle_of_a_write_keeps_the_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "last.pt"
    proc = _child(_MID_WRITE, path)
    try:
        assert proc.stdout.readline().strip() == "MID-WRITE"
    finally:
        _kill(proc)
    ckpt = load_checkpoint(path)
    assert ckpt["meta"] == {"version": 1} and torch.equal(ckpt["model"]["w"], torch.full((1_000_000,), 1.0))
    # the half-written version 2 exists, but only under the temp name, and it does not load
    partial = [p for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert [p.name for p in partial] == [f".last.pt.tmp{proc.pid}"]
    with pytest.raises(CheckpointError, match=str(partial[0])):
        load_checkpoint(partial[0])


@pytest.mark.slow
def test_kill_at_an_arbitrary_moment_of_a_save_loop_leaves_a_complete_checkpoint(tmp_path) -> None:
    path = tmp_path / "last.pt"
    proc = _child(_LOOP, path)
    try:
        done = [int(proc.stdout.readline()) for _ in range(3)]  # three complete saves
        time.sleep(0.037)  # somewhere inside the fourth (or a later) save
    finally:
        _kill(proc)
    ckpt = load_checkpoint(path)
    version = ckpt["meta"]["version"]
    assert version >= done[-1]
    w = ckpt["model"]["w"]
    assert w.shape == (8_000_000,) and torch.equal(w, torch.full_like(w, float(version)))  # whole, not mixed


def test_checkpoint_cadence_in_steps_and_in_epochs(shapes4, tmp_path_factory) -> None:
    """every_steps=4 and every_epochs=2 over 2 epochs x 6 steps: last.pt at steps 4, 8 and 12 (with the epoch and
    the batch position inside it) and at the end of the run (not at the end of the first epoch); best.pt after each
    improving evaluation, at epoch boundaries."""
    run = trained_run(shapes4, tmp_path_factory)
    saves = run["saves"]
    last = [s for s in saves if s[0] == "last.pt"]
    assert last == [("last.pt", 0, 4, 4), ("last.pt", 1, 2, 8), ("last.pt", 1, 6, 12), ("last.pt", 2, 0, 12)]
    best = [s for s in saves if s[0] == "best.pt"]
    assert best and all(batch == 0 and step == 6 * epoch for _, epoch, batch, step in best)
    on_disk = torch.load(run["result"].paths["last"], map_location="cpu", weights_only=True)
    assert (on_disk["epoch"], on_disk["batch"], on_disk["step"]) == (2, 0, 12)
    # best.pt holds the last best save; when that save fell on a last.pt save (the end of the run), the state was
    # written once and both names are the same file.
    best_pt = run["result"].paths["best"]
    assert torch.load(best_pt, map_location="cpu", weights_only=True)["epoch"] == best[-1][1]
    assert best_pt.samefile(run["result"].paths["last"]) == (best[-1][1] == 2)
    if best[-1][1] == 2:  # best.pt first: a crash before last.pt follows leaves last.pt behind, so the epoch is redone
        assert saves[-2:] == [("best.pt", 2, 0, 12), ("last.pt", 2, 0, 12)]


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_linked_checkpoint_keeps_its_state_when_the_source_is_saved_again(tmp_path, hard_links) -> None:
    """best.pt linked to last.pt must not follow later saves of last.pt; without hard links it is a copy."""
    from fastft import checkpoint as ck

    def state(v: int) -> dict:
        return {"model": {"w": torch.full((4,), float(v))}, "meta": {"version": v}}

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    ck.atomic_save(state(1), last)
    ck.atomic_save(state(0), best)  # an older best, replaced by the link
    if hard_links:
        ck.atomic_link(last, best)
    else:
        with mock.patch.object(ck.os, "link", side_effect=OSError(1, "Operation not permitted")):
            ck.atomic_link(last, best)
    assert best.samefile(last) == hard_links
    ck.atomic_save(state(2), last)
    assert load_checkpoint(best)["meta"]["version"] == 1
    assert load_checkpoint(last)["meta"]["version"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp file left
