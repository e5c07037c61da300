"""DirectFile (checkpoint writes that bypass the page cache): the bytes on disk are exactly the bytes written, at every
size around the alignment and the chunk, with O_DIRECT and after falling back to the page cache."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch

from fastft import direct_file
from fastft.checkpoint import atomic_save, load_checkpoint
from fastft.direct_file import ALIGN, CHUNK, DirectFile


def _direct_supported(folder: Path) -> bool:
    """Independent probe: can this folder's filesystem open a file with O_DIRECT?"""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = folder / ".probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


def _payload(n: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).numpy().tobytes()


SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 1, CHUNK, CHUNK + 7, 2 * CHUNK + ALIGN + 3]


@pytest.mark.parametrize("size", SIZES)
def test_file_holds_exactly_the_bytes_written_in_uneven_pieces(tmp_path, size):
    data = _payload(size)
    path = tmp_path / "out.bin"
    f = DirectFile(path)
    pieces = [0, 3, 4093, ALIGN, CHUNK - 5, CHUNK + 11]  # writes straddle the stage's and the blocks' edges
    i, j = 0, 0
    while i < size:
        k = max(1, min(pieces[j % len(pieces)], size - i))
        assert f.write(memoryview(data)[i : i + k]) == k
        i, j = i + k, j + 1
    f.sync_close()
    assert f.size == size
    assert path.read_bytes() == data  # no padding left behind, nothing lost at a chunk edge
    assert f.direct is _direct_supported(tmp_path)


def test_a_refusal_at_open_writes_through_the_page_cache(tmp_path, monkeypatch):
    """tmpfs (before Linux 6.6) and some network or FUSE filesystems refuse O_DIRECT at open() with EINVAL."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_file.os, "open", refusing_open)
    data = _payload(CHUNK + 1234)
    f = DirectFile(tmp_path / "out.bin")
    f.write(data)
    f.sync_close()
    assert not f.direct
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_missing_folder_is_still_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        DirectFile(tmp_path / "no" / "out.bin")


def test_a_refusal_at_the_first_write_falls_back_without_losing_a_byte(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT at open() and refuse the I/O (EINVAL): the flag is dropped, the write
    retried through the page cache, and the file is still exact (offsets stay right across the switch)."""
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open()")
    real_write, refused = os.write, []

    def write(fd, buf):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(buf))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)

    monkeypatch.setattr(direct_file.os, "write", write)
    data = _payload(2 * CHUNK + 99)
    f = DirectFile(tmp_path / "out.bin")
    assert f.direct
    f.write(data)
    f.sync_close()
    assert refused == [CHUNK] and not f.direct
    assert (tmp_path / "out.bin").read_bytes() == data


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def write(fd, buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_file.os, "write", write)
    f = DirectFile(tmp_path / "out.bin")
    with pytest.raises(OSError, match="No space left"):
        f.write(_payload(CHUNK))
        f.sync_close()
    f.close()


def test_atomic_save_through_direct_io_loads_back_with_its_checksums(tmp_path):
    """A checkpoint-shaped object, several chunks long, round-trips through atomic_save and the safe loader (which
    checks each record's CRC-32), with no temp file left."""
    g = torch.Generator().manual_seed(0)
    obj = {
        "model": {"w": torch.randn(1000, 3001, generator=g), "b": torch.randn(7, generator=g)},
        "step": 12,
        "best": {"val/accuracy": 0.5},
        "meta": {"config": {}},
    }
    path = tmp_path / "last.pt"
    atomic_save(obj, path)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and torch.equal(back["model"]["b"], obj["model"]["b"])
    assert back["step"] == 12 and back["best"] == {"val/accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
