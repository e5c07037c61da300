"""The file checks and the bad-file policy (fastft/data/checks.py): every way a file can fail is found up front, special
files are never opened, and the policy drops or names the files."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastft.data import checks
from fastft.data.synthetic import write_corrupt_files, write_undecodable_files
from fastft.errors import DataError


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_readable_images_pass(good) -> None:
    assert checks.check_image(str(good)) is None


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "truncated"),
        ("zero_byte", "empty file"),
        ("not_image", "not an image"),
        ("bad_frame_header", "not an image"),
        ("over_pixel_limit", "400000000 pixels"),
    ],
)
def test_files_no_decoder_accepts_are_bad(tmp_path, kind, reason) -> None:
    path = {**write_corrupt_files(tmp_path), **write_undecodable_files(tmp_path)}[kind]
    assert reason in checks.check_image(str(path))


def test_an_image_just_over_the_pixel_limit_is_bad(good, monkeypatch) -> None:
    """PIL only warns between one and two times its limit (and decodes); the check refuses from one time on, as the
    torchvision loader does, so both loaders agree on which files are too big."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 48 - 1)
    assert "48x40 pixels is over the limit of 1919" in checks.check_image(str(good))
    from fastft.data.torch_loader import open_rgb

    with pytest.raises(DataError, match=re.escape(f"unreadable image file {good}: 48x40 pixels is over the limit")):
        open_rgb(str(good))


def _special_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    device = tmp_path / "device.jpg"
    device.symlink_to("/dev/zero")  # a link to a device: followed, then refused by type
    sock_path = tmp_path / "sock.jpg"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    dangling = tmp_path / "dangling.jpg"
    dangling.symlink_to(tmp_path / "gone.jpg")
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    return {
        "named pipe": fifo,
        "character device": device,
        "socket": sock_path,
        "No such file": dangling,
        "Too many levels of symbolic links": loop,
    }


def test_special_files_are_bad_and_never_opened(tmp_path) -> None:
    """Checked in a thread with a time limit: opening the pipe for reading would block until a writer comes."""
    files = _special_files(tmp_path)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(bad=checks.scan_images([str(p) for p in files.values()])))
    worker.start()
    worker.join(timeout=30)
    if worker.is_alive():
        with open(files["named pipe"], "wb"):  # unblock the reader, then fail
            pass
        pytest.fail("the check blocked on a named pipe")
    reasons = dict(result["bad"])
    for expected, path in files.items():
        assert expected in reasons[str(path)], (path, reasons)


def test_loaders_open_only_regular_files(tmp_path) -> None:
    """A file swapped for a pipe after the check fails when a loader reaches it, naming it, instead of hanging."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    from fastft.data.torch_loader import open_rgb

    with pytest.raises(DataError, match=re.escape(f"unreadable image file {fifo}: a named pipe")):
        open_rgb(str(fifo))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_bad(good) -> None:
    good.chmod(0)
    assert "Permission denied" in checks.check_image(str(good))


def test_screen_applies_the_policy(tmp_path, good, caplog) -> None:
    bad = write_undecodable_files(tmp_path)
    samples = [(str(good), 0), (str(bad["bad_frame_header"]), 1), (str(good), 2), (str(bad["over_pixel_limit"]), 3)]
    with pytest.raises(DataError) as info:
        checks.screen(samples, on_bad_file="error", threads=2)
    line = str(info.value)
    assert line.startswith(f"unreadable image file {bad['bad_frame_header']}: ") and "(and 1 more)" in line
    assert "\n" not in line and "data.on_bad_file=skip" in line
    with caplog.at_level(logging.WARNING, logger="fastft"):
        kept, skipped = checks.screen(samples, on_bad_file="skip", threads=2)
    assert kept == [samples[0], samples[2]]
    assert skipped == [str(bad["bad_frame_header"]), str(bad["over_pixel_limit"])]
    assert all(p in caplog.text for p in skipped)


def test_ranks_share_the_check_and_skip_the_same_files(tmp_path, good) -> None:
    """Under torchrun each rank checks its own 1/world of the files and all ranks get the whole list of bad ones: the
    same files are dropped everywhere, so every rank plans the same batches."""
    import json

    from conftest import run_torchrun_script

    bad = write_undecodable_files(tmp_path / "bad")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    paths = [str(good)] * 3 + [str(bad["bad_frame_header"]), str(fifo), str(bad["over_pixel_limit"])]
    samples = [(p, i) for i, p in enumerate(paths)]
    (tmp_path / "samples.json").write_text(json.dumps(samples))
    script = Path(__file__).with_name("_screen_ranks.py")
    proc = run_torchrun_script(2, script, str(tmp_path / "samples.json"), str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    want = [str(bad["bad_frame_header"]), str(fifo), str(bad["over_pixel_limit"])]
    assert [r["skipped"] for r in ranks] == [want, want]
    assert [r["kept"] for r in ranks] == [[list(s) for s in samples[:3]]] * 2
    assert [len(r["seen"]) for r in ranks] == [3, 3]  # each file checked once, on one rank
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == sorted(paths)
