"""Output safety: an unwritable or full output folder, or an existing run folder, is refused before any training (exit
code 2, one line naming the folder), never after the work is done."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from _reliability import FAST, child_env, cli, error_line, events, mentions

import fastft.losses
import fastft.train
import fastft.trainer


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

    monkeypatch.setattr(fastft.losses, "F", types.SimpleNamespace(cross_entropy=nan_loss))  # dies at step 1
    rc, err = _train(shapes4, tmp_path, "--overwrite")
    assert rc == 2 and "step 1" in error_line(err)
    run = tmp_path / "r"
    assert (run / "precious.txt").read_text() == "keep me"
    assert not (run / "last.pt").exists()
    assert [e["event"] for e in events(run)] == ["start"]


def test_a_refusal_happens_before_the_model_is_built(shapes4, tmp_path, monkeypatch) -> None:
    # "Before training starts" in the strongest sense: not even the model or the loaders are built.
    _previous_run(tmp_path / "r")
    monkeypatch.setattr(fastft.trainer, "build_backbone", lambda *a, **k: pytest.fail("model built before the refusal"))
    rc, err = _train(shapes4, tmp_path)
    assert rc == 2 and "already exists" in error_line(err)


# --------------------------------------------------------------------------------------------------------------------
# One rule for every output target: never an input, never a file fastft did not write, checked before any work


@pytest.fixture(scope="module")
def trained(shapes4, tmp_path_factory):
    from _reliability import trained_run

    return trained_run(shapes4, tmp_path_factory)["result"]


def _first_class(root: Path) -> Path:
    return sorted((root / "val").iterdir())[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _predict(ckpt: Path, inputs: Path, out: Path) -> tuple[int, str]:
    return cli("predict", "--checkpoint", str(ckpt), "--input", str(inputs), "--out", str(out), "--workers", "0")


def _eval(ckpt: Path, data: Path, *extra: str) -> tuple[int, str]:
    return cli("eval", "--checkpoint", str(ckpt), "--data", str(data), "--workers", "0", "--device", "cpu", *extra)


def test_predict_never_writes_over_the_checkpoint_it_reads(trained, shapes4, tmp_path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "best.pt").write_bytes(trained.paths["best"].read_bytes())
    os.link(run / "best.pt", run / "last.pt")  # as a run links last.pt to best.pt: the same file under another name
    before = _snapshot(run)
    for target in (run / "best.pt", run / "last.pt", run / "sub" / ".." / "best.pt"):
        rc, err = _predict(run / "best.pt", shapes4 / "val", target)
        assert rc == 2 and mentions(error_line(err), str(target), "checkpoint"), err[-2000:]
    assert _snapshot(run) == before


def test_predict_onto_a_folder_is_one_line_and_leaves_no_temp_file(trained, shapes4, tmp_path, monkeypatch) -> None:
    import fastft.api

    monkeypatch.setattr(fastft.api, "load_trained", lambda *a, **k: pytest.fail("model loaded before the refusal"))
    (tmp_path / "out").mkdir()
    rc, err = _predict(trained.paths["best"], shapes4 / "val", tmp_path / "out")
    assert rc == 2 and mentions(error_line(err), str(tmp_path / "out"), "folder")
    assert list(tmp_path.rglob("*")) == [tmp_path / "out"]


def test_predict_replaces_its_own_csv_but_no_other_file(trained, shapes4, tmp_path) -> None:
    other = tmp_path / "notes.csv"
    other.write_text("a,b\n1,2\n")
    rc, err = _predict(trained.paths["best"], _first_class(shapes4), other)
    assert rc == 2 and mentions(error_line(err), str(other), "not a fastft predictions CSV")
    assert other.read_text() == "a,b\n1,2\n"
    mine = tmp_path / "new" / "deeper" / "pred.csv"  # missing folders are made
    assert _predict(trained.paths["best"], _first_class(shapes4), mine)[0] == 0
    mine.write_text(mine.read_text().splitlines()[0] + "\nstale,row,1.0\n")
    rc, err = _predict(trained.paths["best"], _first_class(shapes4), mine)
    assert rc == 0, err[-2000:]
    rows = mine.read_text().splitlines()
    assert len(rows) == 1 + 6 and "stale" not in mine.read_text()
    assert sorted(p.name for p in mine.parent.iterdir()) == ["pred.csv"]  # no temp file left


def test_a_failed_predict_leaves_no_temp_file_and_no_folder(trained, shapes4, tmp_path, monkeypatch) -> None:
    import fastft.api

    real = fastft.api.load_trained

    def breaks_midway(*args, **kwargs):
        _model, meta = real(*args, **kwargs)
        return (lambda x: (_ for _ in ()).throw(RuntimeError("boom"))), meta

    monkeypatch.setattr(fastft.api, "load_trained", breaks_midway)
    with pytest.raises(RuntimeError, match="boom"):
        fastft.api.predict(trained.paths["best"], shapes4 / "val", tmp_path / "made" / "p.csv", workers=0)
    assert list(tmp_path.iterdir()) == []


def test_eval_onto_an_existing_file_is_refused_before_evaluating(trained, shapes4, tmp_path, monkeypatch) -> None:
    import fastft.api

    monkeypatch.setattr(fastft.api, "run_evaluation", lambda *a, **k: pytest.fail("evaluated before the refusal"))
    target = tmp_path / "report.txt"
    target.write_text("mine")
    rc, err = _eval(trained.paths["best"], shapes4 / "val", "--out", str(target))
    assert rc == 2 and mentions(error_line(err), str(target), "not a folder")
    assert target.read_text() == "mine"


def test_eval_into_a_run_folder_keeps_its_report_unless_overwrite(trained, shapes4, tmp_path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    for name in ("metrics.json", "confusion_matrix.png", "best.pt"):
        (run / name).write_bytes((trained.run_dir / name).read_bytes())
    before = _snapshot(run)
    rc, err = _eval(run / "best.pt", shapes4 / "val", "--out", str(run))
    assert rc == 2 and mentions(error_line(err), str(run / "metrics.json"), "--overwrite")
    assert _snapshot(run) == before
    rc, err = _eval(run / "best.pt", shapes4 / "val", "--out", str(run), "--overwrite")
    assert rc == 0, err[-2000:]
    assert (run / "best.pt").read_bytes() == before["best.pt"]
    (run / "metrics.json").write_text('{"mine": 1}')  # not a fastft report: kept even with --overwrite
    rc, err = _eval(run / "best.pt", shapes4 / "val", "--out", str(run), "--overwrite")
    assert rc == 2 and mentions(error_line(err), "not written by fastft")
    assert (run / "metrics.json").read_text() == '{"mine": 1}'


def test_overwrite_keeps_the_old_run_when_a_later_check_fails(shapes4, tmp_path) -> None:
    # The data check (every file opened) and the metric check come after the run folder is picked: the old outputs
    # may only go once they passed.
    data = tmp_path / "data"
    shutil.copytree(shapes4, data)
    before = _previous_run(tmp_path / "r")
    rc, err = _train(data, tmp_path, "--overwrite", "--checkpoint.best_metric=f1_makro")
    assert rc == 2 and mentions(error_line(err), "f1_makro", "f1_macro")
    (data / "train" / _first_class(shapes4).name / "broken.jpg").write_bytes(b"not a jpeg")
    rc, err = _train(data, tmp_path, "--overwrite")
    assert rc == 2 and mentions(error_line(err), "broken.jpg")
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before


def test_a_refused_run_leaves_no_folder_behind(shapes4, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fastft.trainer, "build_optimizer", lambda *a, **k: pytest.fail("refused too late"))
    for bad in ("--checkpoint.best_metric=auroc", "--optim.unfreeze=['2:layer9']", "--optim.unfreeze=['5:layer4']"):
        rc, err = _train(shapes4, tmp_path / "out", bad, "--optim.max_steps=0", "--optim.epochs=2")
        line = error_line(err)
        assert rc == 2 and mentions(line, bad.split("=")[0].removeprefix("--").split(".")[0])
        assert not (tmp_path / "out").exists(), bad


def test_a_run_never_writes_over_its_own_inputs(shapes4, tmp_path) -> None:
    run = tmp_path / "r"
    before = _previous_run(run)
    (run / "config.toml").write_text(f'[data]\nroot = "{shapes4}"\n')
    before = _snapshot(run)
    rc, err = _train(shapes4, tmp_path, "--overwrite", f"--model.weights={run / 'last.pt'}")
    assert rc == 2 and mentions(error_line(err), str(run / "last.pt"), "model.weights")
    rc, err = _train(shapes4, tmp_path, "--overwrite", "--config", str(run / "config.toml"))
    assert rc == 2 and mentions(error_line(err), str(run / "config.toml"), "config file")
    data = tmp_path / "data"
    shutil.copytree(shapes4, data)
    rc, err = _train(data, data / "train")  # the run folder would become a class folder of the next run
    assert rc == 2 and mentions(error_line(err), str(data / "train" / "r"), "inside the data folder")
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(p.name for p in (shapes4 / "train").iterdir())
    assert _snapshot(run) == before


def test_a_nan_before_any_save_does_not_point_at_a_checkpoint(shapes4, tmp_path, monkeypatch) -> None:
    def nan_loss(*args, **kwargs):
        return torch.nn.functional.cross_entropy(*args, **kwargs) * float("nan")

    monkeypatch.setattr(fastft.losses, "F", types.SimpleNamespace(cross_entropy=nan_loss))
    rc, err = _train(shapes4, tmp_path)
    line = error_line(err)
    assert rc == 2 and mentions(line, "step 1", "no checkpoint was written", str(tmp_path / "r"))
    assert not (tmp_path / "r" / "last.pt").exists()
