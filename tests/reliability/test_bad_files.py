"""Bad and unusual image files, for both loaders: `data.on_bad_file = error` stops the run naming the file; `skip`
drops it, logs it and lists it in the run folder; valid-but-unusual images (CMYK, grayscale, alpha, 16-bit, very
large) are converted to RGB and trained on. Bad includes files that look like JPEGs at both ends but that no decoder
accepts (a broken frame header, a size over PIL's pixel limit) and special files (a named pipe called `x.jpg`): all
are found before training starts, so `skip` drops them on every rank alike."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from _reliability import FAST, cli, error_line, events, mentions

from fastft.data.loaders import dali_available
from fastft.data.synthetic import (
    make_image_folder,
    write_corrupt_files,
    write_undecodable_files,
    write_unusual_images,
)

UNDECODABLE = ("bad_frame_header", "over_pixel_limit")  # intact JPEG start and end markers
BROKEN = ("truncated", "zero_byte", "not_image", *UNDECODABLE)
UNUSUAL = ("cmyk", "gray", "rgba_png", "png16", "large")
GOOD_TRAIN = 2 * 4  # the base folder: 2 classes x 4 train images

_needs_dali = [pytest.mark.dali, pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")]
LOADERS = [pytest.param("torch", id="torch"), pytest.param("dali", id="dali", marks=_needs_dali)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("tiny2"), num_classes=2, train_per_class=4, val_per_class=2, image_size=32, seed=5
    )


def _data(base: Path, dst: Path, *, broken: tuple[str, ...] = (), unusual: bool = False) -> tuple[Path, dict]:
    """A copy of `base` with the chosen broken files (and the unusual images) in the train folder of one class."""
    shutil.copytree(base, dst)
    target = dst / "train" / "checker"
    files: dict[str, Path] = {}
    written = {**write_corrupt_files(target), **write_undecodable_files(target)} if broken else {}
    for kind, path in written.items():
        if kind in broken:
            files[kind] = path
        else:
            path.unlink()
    if unusual:
        files.update(write_unusual_images(target))
    return dst, files


def _train(data: Path, out: Path, loader: str, mode: str) -> tuple[int, str]:
    # batch 1: steps_per_epoch is the number of training images the loader kept
    return cli(
        "train",
        f"--data.root={data}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=1",
        "--model.freeze=backbone",
        "--optim.epochs=1",
        f"--data.loader={loader}",
        f"--data.on_bad_file={mode}",
        f"--run.out_dir={out}",
        "--run.name=r",
    )


def _steps_per_epoch(run_dir: Path) -> int:
    return next(e for e in events(run_dir) if e["event"] == "start")["steps_per_epoch"]


# --------------------------------------------------------------------------------------------------------------------
# error


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("loader", LOADERS)
def test_a_broken_file_stops_the_run_naming_it(base, tmp_path, loader, kind) -> None:
    data, files = _data(base, tmp_path / "data", broken=(kind,))
    rc, err = _train(data, tmp_path / "runs", loader, "error")
    line = error_line(err)
    assert rc == 2 and str(files[kind]) in line
    assert "<_io." not in line  # the file is named, not PIL's in-memory buffer
    # found by the up-front check, not when a batch reaches it
    assert [e for e in events(tmp_path / "runs" / "r") if e["event"] in ("start", "step")] == []
    assert not (tmp_path / "runs" / "r" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "loader",
    [
        pytest.param(
            "torch",
            id="torch",
        ),
        pytest.param("dali", id="dali", marks=_needs_dali),
    ],
)
def test_broken_files_stop_the_run_before_training_starts(base, tmp_path, loader) -> None:
    data, _ = _data(base, tmp_path / "data", broken=BROKEN)
    rc, err = _train(data, tmp_path / "runs", loader, "error")
    assert rc == 2, err[-2000:]
    assert [e for e in events(tmp_path / "runs" / "r") if e["event"] in ("start", "step")] == []


# --------------------------------------------------------------------------------------------------------------------
# skip


@pytest.fixture(scope="module", params=LOADERS)
def skipped_run(request, base, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp(f"skip-{request.param}")
    data, files = _data(base, tmp / "data", broken=BROKEN, unusual=True)
    rc, err = _train(data, tmp / "runs", request.param, "skip")
    return {
        "loader": request.param,
        "rc": rc,
        "log": err,
        "run_dir": tmp / "runs" / "r",
        "broken": sorted(str(files[k]) for k in BROKEN),
    }


def test_skip_mode_trains_on_every_readable_file(skipped_run) -> None:
    assert skipped_run["rc"] == 0, skipped_run["log"][-3000:]
    assert _steps_per_epoch(skipped_run["run_dir"]) == GOOD_TRAIN + len(UNUSUAL)  # broken dropped, unusual kept
    assert (skipped_run["run_dir"] / "model.safetensors").is_file()


def test_skip_mode_logs_each_skipped_file(skipped_run) -> None:
    logged = [p for p in skipped_run["broken"] if p in skipped_run["log"]]
    assert logged == skipped_run["broken"], skipped_run["log"][-3000:]


def test_skip_mode_lists_the_skipped_files_in_the_run_folder(skipped_run) -> None:
    listed = skipped_run["run_dir"] / "skipped_files.txt"
    assert sorted(listed.read_text().splitlines()) == skipped_run["broken"]


# --------------------------------------------------------------------------------------------------------------------
# unusual but valid


@pytest.mark.parametrize("loader", LOADERS)
def test_unusual_images_are_converted_and_trained_on(base, tmp_path, loader) -> None:
    data, _ = _data(base, tmp_path / "data", unusual=True)
    rc, err = _train(data, tmp_path / "runs", loader, "error")  # the strict mode: none of them counts as broken
    assert rc == 0, err[-3000:]
    assert _steps_per_epoch(tmp_path / "runs" / "r") == GOOD_TRAIN + len(UNUSUAL)


@pytest.mark.parametrize("loader", [pytest.param("dali", marks=_needs_dali)])
def test_dali_decodes_unusual_images_like_the_torchvision_path(tmp_path, loader) -> None:
    """Each unusual file comes out of open_rgb as RGB, and DALI's eval pipeline gives the same pixels as the
    torchvision path within one 8-bit level (the same contract as for ordinary JPEGs)."""
    from fastft.data.dali_feed import DaliLoader
    from fastft.data.torch_loader import TorchLoader, open_rgb
    from fastft.data.transforms import TransformSpec

    files = write_unusual_images(tmp_path)
    samples = [(str(files[k]), i) for i, k in enumerate(UNUSUAL)]
    assert {k: open_rgb(str(p)).mode for k, p in files.items()} == dict.fromkeys(files, "RGB")
    spec = TransformSpec(crop_size=32, resize_size=37)
    ref = next(iter(TorchLoader(samples, spec, train=False, batch_size=len(samples), workers=0)))[0]
    got = next(
        iter(
            DaliLoader(
                samples,
                train=False,
                batch_size=len(samples),
                crop_size=32,
                resize_size=37,
                mean=spec.mean,
                std=spec.std,
                threads=1,
            )
        )
    )[0]
    levels = ((got - ref) * torch.tensor(spec.std).view(3, 1, 1) * 255).abs().amax(dim=(1, 2, 3))
    assert dict(zip(UNUSUAL, levels.tolist())) == pytest.approx(dict.fromkeys(UNUSUAL, 0.0), abs=1.01)


# --------------------------------------------------------------------------------------------------------------------
# special files


@contextlib.contextmanager
def pipe_watch(fifo: Path):
    """Yield a list that records every time something opened `fifo` for reading. A watcher thread polls for a reader
    (a non-blocking open for writing succeeds only when one is waiting) and then closes its end, so the reader gets
    end-of-file: code that opens the pipe fails the test instead of hanging it."""
    opened: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader
                continue
            opened.append(time.monotonic())
            os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("loader", LOADERS)
def test_a_named_pipe_is_never_opened(base, tmp_path, loader, mode) -> None:
    """A FIFO called `x.jpg` would block the first open forever (no writer ever comes): it is a bad file under either
    policy, refused from its type alone, never opened."""
    data, _ = _data(base, tmp_path / "data")
    fifo = data / "train" / "checker" / "pipe.jpg"
    os.mkfifo(fifo)
    with pipe_watch(fifo) as opened:
        rc, err = _train(data, tmp_path / "runs", loader, mode)
    assert opened == [], f"the run opened the named pipe {fifo} (it would have hung)"
    run_dir = tmp_path / "runs" / "r"
    if mode == "error":
        assert rc == 2 and mentions(error_line(err), str(fifo), "named pipe")
        assert [e for e in events(run_dir) if e["event"] in ("start", "step")] == []
    else:
        assert rc == 0, err[-3000:]
        assert _steps_per_epoch(run_dir) == GOOD_TRAIN
        assert (run_dir / "skipped_files.txt").read_text().splitlines() == [str(fifo)]


# --------------------------------------------------------------------------------------------------------------------
# predict reads its inputs through the same check and policy


def test_predict_applies_the_bad_file_policy_and_keeps_rows_aligned(shapes4, tmp_path_factory, tmp_path) -> None:
    from _reliability import trained_run

    from fastft.api import predict
    from fastft.errors import DataError

    ckpt = trained_run(shapes4, tmp_path_factory)["result"].paths["last"]
    inputs = tmp_path / "in"
    good = [sorted((shapes4 / "val" / c).glob("*.jpg"))[0] for c in ("circle", "checker", "diamond")]
    inputs.mkdir()
    for i, src in enumerate(good):  # bad files sort between good ones: rows must not shift onto other files
        shutil.copy(src, inputs / f"{2 * i}.jpg")
    bad = write_undecodable_files(tmp_path / "bad")
    shutil.copy(bad["bad_frame_header"], inputs / "1.jpg")
    os.mkfifo(inputs / "3.jpg")
    with pytest.raises(DataError, match=f"unreadable image file {inputs / '1.jpg'}: "):
        predict(ckpt, inputs, tmp_path / "error.csv", workers=0, device="cpu")
    out = predict(ckpt, inputs, tmp_path / "skip.csv", workers=0, device="cpu", on_bad_file="skip")
    rows = out.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(inputs / f"{i}.jpg") for i in (0, 2, 4)]
    # each row's prediction is that file's own: the same as predicting the file alone (up to batch-size rounding),
    # and the three files' own predictions differ, so a row shifted onto another file would show
    alone = []
    for row in rows:
        one = predict(ckpt, row.split(",")[0], tmp_path / "one.csv", workers=0, device="cpu")
        alone.append(one.read_text().splitlines()[1].split(","))
    got = [r.split(",") for r in rows]
    assert [g[:2] for g in got] == [a[:2] for a in alone]
    assert [float(g[2]) for g in got] == pytest.approx([float(a[2]) for a in alone], abs=1e-5)
    assert len({(a[1], round(float(a[2]), 3)) for a in alone}) == 3
