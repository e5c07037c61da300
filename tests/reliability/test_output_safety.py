"""Output safety: an unwritable or full output folder, or an existing run folder, is refused before any training (exit
code 2, one line naming the folder), never after the work is done."""

from __future__ import annotations

import ctypes
import os
import resource
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from _reliability import FAST, child_env, cli, error_line, events, mentions

import fastft.train


def _train(shapes4, out: Path, *extra: str) -> tuple[int, str]:
    return cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=8",
        "--model.freeze=backbone",
        "--optim.max_steps=1",
        f"--run.out_dir={out}",
        "--run.name=r",
        *extra,
    )


def _nothing_trained(run: Path) -> None:
    assert not (run / "last.pt").exists() and not (run / "model.safetensors").exists()
    assert [e for e in events(run) if e["event"] in ("start", "step")] == []


# --------------------------------------------------------------------------------------------------------------------
# Unwritable


def test_an_output_folder_under_a_regular_file_is_refused(shapes4, tmp_path) -> None:
    # Fails for root too (chmod does not stop root): nothing can be created below a file.
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where the output folder should be")
    rc, err = _train(shapes4, blocker)
    assert rc == 2 and mentions(error_line(err), str(blocker / "r"), "not writable", "Not a directory")
    assert blocker.read_text() == "a file where the output folder should be"


NO_ACCESS_BUG = (
    "BUG: prepare_run_dir calls run_dir.exists(), which raises PermissionError for a folder that cannot be searched; "
    "it escapes as a traceback (exit 1) instead of the one-line ConfigError"
)
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not dlopen


def _obey_permission_bits() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set before exec, so a root child
    obeys permission bits like any user (the tests run as root here). Exit 97 when that is not allowed."""
    if os.geteuid() != 0:
        return
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if _LIBC.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


def _limit_file_size() -> None:
    """preexec_fn: every write past 1 KiB fails with EFBIG (Python ignores SIGXFSZ), like a full disk or a quota, and
    for root too."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def _child_train(shapes4, out: Path, preexec) -> subprocess.CompletedProcess:
    args = ["train", f"--data.root={shapes4}", *FAST, "--data.workers=0", "--model.freeze=backbone"]
    return subprocess.run(
        [sys.executable, "-m", "fastft", *args, f"--run.out_dir={out}", "--run.name=r"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
        preexec_fn=preexec,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(0o500, id="read-only"),
        pytest.param(0o000, id="no-access"),
    ],
)
def test_a_folder_without_write_permission_is_refused_before_training(shapes4, tmp_path, mode) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(mode)
    try:
        p = _child_train(shapes4, out, _obey_permission_bits)
    finally:
        out.chmod(0o700)
    if p.returncode == 97:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here, and root ignores permission bits")
    assert p.returncode == 2, p.stderr[-3000:]
    assert mentions(error_line(p.stderr), str(out / "r"), "not writable", "Permission denied")
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_an_output_folder_that_cannot_take_a_write_is_refused_before_training(shapes4, tmp_path) -> None:
    p = _child_train(shapes4, tmp_path, _limit_file_size)
    assert p.returncode == 2, p.stderr[-3000:]
    assert mentions(error_line(p.stderr), str(tmp_path / "r"), "not writable", "File too large")
    _nothing_trained(tmp_path / "r")


def test_an_output_folder_without_room_for_a_checkpoint_is_refused_before_training(
    shapes4, tmp_path, monkeypatch
) -> None:
    real = os.statvfs

    def one_mib_free(path):
        s = real(path)
        return os.statvfs_result(
            (s.f_bsize, 4096, s.f_blocks, 256, 256, s.f_files, s.f_ffree, s.f_favail, s.f_flag, s.f_namemax)
        )

    monkeypatch.setattr(os, "statvfs", one_mib_free)  # what shutil.disk_usage reads
    rc, err = _train(shapes4, tmp_path)
    assert rc == 2, err[-2000:]
    line = error_line(err)
    assert mentions(line, str(tmp_path / "r"), "space")
    _nothing_trained(tmp_path / "r")


# --------------------------------------------------------------------------------------------------------------------
# Existing run folder


def _previous_run(run: Path) -> dict[str, bytes]:
    run.mkdir(parents=True)
    (run / "precious.txt").write_text("keep me")
    (run / "events.jsonl").write_text('{"event": "start", "resumed_from": null}\n{"event": "end", "step": 99}\n')
    torch.save({"model": {}, "meta": {}, "step": 99}, run / "last.pt")
    return {p.name: p.read_bytes() for p in run.iterdir()}


def test_an_existing_run_folder_is_refused_and_left_untouched(shapes4, tmp_path) -> None:
    before = _previous_run(tmp_path / "r")
    rc, err = _train(shapes4, tmp_path)
    line = error_line(err)
    assert rc == 2 and mentions(line, str(tmp_path / "r"), "already exists", "overwrite")
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before


def test_overwrite_reuses_an_existing_run_folder(shapes4, tmp_path) -> None:
    _previous_run(tmp_path / "r")
    rc, err = _train(shapes4, tmp_path, "--overwrite")
    assert rc == 0, err[-3000:]
    run = tmp_path / "r"
    assert (run / "precious.txt").read_text() == "keep me"  # not fastft's file: never deleted
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 1 and (run / "model.safetensors").is_file()


def test_overwrite_clears_the_previous_runs_outputs_before_training(shapes4, tmp_path, monkeypatch) -> None:
    _previous_run(tmp_path / "r")

    def nan_loss(*args, **kwargs):
        return torch.nn.functional.cross_entropy(*args, **kwargs) * float("nan")

    monkeypatch.setattr(fastft.train, "F", types.SimpleNamespace(cross_entropy=nan_loss))  # dies at step 1
    rc, err = _train(shapes4, tmp_path, "--overwrite")
    assert rc == 2 and "step 1" in error_line(err)
    run = tmp_path / "r"
    assert (run / "precious.txt").read_text() == "keep me"
    assert not (run / "last.pt").exists()
    assert [e["event"] for e in events(run)] == ["start"]


def test_a_refusal_happens_before_the_model_is_built(shapes4, tmp_path, monkeypatch) -> None:
    # "Before training starts" in the strongest sense: not even the model or the loaders are built.
    _previous_run(tmp_path / "r")
    monkeypatch.setattr(fastft.train, "build_model", lambda *a, **k: pytest.fail("model built before the refusal"))
    rc, err = _train(shapes4, tmp_path)
    assert rc == 2 and "already exists" in error_line(err)
