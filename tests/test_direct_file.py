"""DirectFile (checkpoint writes that bypass the page cache): the bytes on disk are exactly the bytes written, at every
size around the alignment and the chunk, with O_DIRECT and after falling back to the page cache."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastft import direct_file
from fastft.checkpoint import atomic_save, load_checkpoint
from fastft.direct_file import ALIGN, CHUNK, DIRECT_MIN, DirectFile, aligned_empty_like


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


def test_atomic_save_through_direct_io_loads_back(tmp_path):
    """A checkpoint-shaped object, several chunks long, round-trips through atomic_save and the safe loader, with no
    temp file left."""
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


def _record_writes(monkeypatch) -> list[tuple[int, int]]:
    """Patch os.write to note (address of the buffer's first byte, length) of every call."""
    real_write, calls = os.write, []

    def write(fd, buf):
        mv = memoryview(buf).cast("B")
        calls.append((np.frombuffer(mv, dtype=np.uint8).ctypes.data if len(mv) else 0, len(mv)))
        return real_write(fd, buf)

    monkeypatch.setattr(direct_file.os, "write", write)
    return calls


def _aligned_bytes(n: int, seed: int) -> torch.Tensor:
    t = aligned_empty_like(torch.empty(n, dtype=torch.uint8))
    t.copy_(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8))
    return t


def test_an_aligned_buffer_at_an_aligned_offset_is_written_from_where_it_lies(tmp_path, monkeypatch):
    """The snapshot's page-aligned buffers reach the file without passing through the stage: the os.write call that
    carries them is given their own address. Misaligned pieces around them still come out exact."""
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open()")
    calls = _record_writes(monkeypatch)
    head = _payload(ALIGN * 2)  # leaves the offset aligned, staged (not from an aligned buffer of ours)
    big = _aligned_bytes(3 * CHUNK + ALIGN + 123, 1)  # aligned source, length not a block multiple
    odd = _payload(5)
    late = _aligned_bytes(DIRECT_MIN * 2, 2)  # aligned source at a misaligned offset (after `odd`): staged
    f = DirectFile(tmp_path / "out.bin")
    for piece in (head, big.numpy(), odd, late.numpy()):
        f.write(piece)
    f.sync_close()
    expected = head + big.numpy().tobytes() + odd + late.numpy().tobytes()
    assert (tmp_path / "out.bin").read_bytes() == expected
    direct_len = len(big) - len(big) % ALIGN
    assert (big.data_ptr(), direct_len) in calls  # straight from the buffer, its whole aligned part in one call
    assert not any(a == late.data_ptr() for a, _ in calls)  # the misaligned offset sent it through the stage
    assert calls[0] == (calls[0][0], 2 * ALIGN)  # the staged head went first, on its own


def test_a_refusal_of_a_direct_write_from_the_callers_buffer_falls_back_exactly(tmp_path, monkeypatch):
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT at open()")
    real_write, refused = os.write, []
    big = _aligned_bytes(2 * CHUNK + 77, 3)

    def write(fd, buf):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and len(buf) > CHUNK:
            refused.append(len(buf))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, buf)

    monkeypatch.setattr(direct_file.os, "write", write)
    f = DirectFile(tmp_path / "out.bin")
    head = _payload(ALIGN)
    f.write(head)
    f.write(big.numpy())
    f.sync_close()
    assert refused == [2 * CHUNK] and not f.direct
    assert (tmp_path / "out.bin").read_bytes() == head + big.numpy().tobytes()


def test_aligned_empty_like_keeps_shape_dtype_and_strides_in_page_aligned_memory():
    w = torch.randn(64, 32, 3, 3).contiguous(memory_format=torch.channels_last)
    buf = aligned_empty_like(w)
    assert buf.shape == w.shape and buf.dtype == w.dtype and buf.stride() == w.stride()
    assert buf.data_ptr() % ALIGN == 0 and buf.untyped_storage().nbytes() == w.numel() * w.element_size()
    buf.copy_(w)
    assert torch.equal(buf, w)
    small = aligned_empty_like(torch.zeros(7))
    assert small.shape == (7,) and small.untyped_storage().nbytes() == 28  # small: a plain allocation of its own
    strided = torch.randn(400, 400)[:, ::2]  # not dense: strides with gaps cannot be laid over a dense mapping
    out = aligned_empty_like(strided)
    assert out.shape == strided.shape and out.stride() == torch.empty_like(strided).stride() == (200, 1)


def test_checkpoint_records_are_page_aligned_without_crc_and_the_thread_keeps_its_options(tmp_path):
    """atomic_save asks torch.save for page-aligned records (aligned buffers then skip the stage) and no CRC-32 (torch
    .load never checks it); the options hold for that call only."""
    g = torch.Generator().manual_seed(1)
    obj = {"model": {"w": torch.randn(300, 301, generator=g), "b": torch.randn(3, generator=g)}, "meta": {}}
    atomic_save(obj, tmp_path / "c.pt")
    raw = (tmp_path / "c.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "c.pt") as z:
        data = [i for i in z.infolist() if "/data/" in i.filename]
        assert len(data) == 2
        for info in data:
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            assert start % ALIGN == 0, info.filename
            assert info.CRC == 0
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["w"], obj["model"]["w"])
    assert torch.serialization.get_crc32_options() is True


def test_while_the_writer_thread_saves_without_crc_other_threads_keep_theirs(tmp_path, monkeypatch):
    """The writer runs atomic_save on its own thread: held inside it (mid-write), another thread's torch.save still
    computes CRC-32 and uses torch's default alignment."""
    import threading

    from fastft.checkpoint import _config_per_thread

    assert _config_per_thread() is not None  # torch 2.14 keeps config overrides per thread
    inside, release, real_write = threading.Event(), threading.Event(), DirectFile.write

    def held_write(self, data):
        inside.set()
        release.wait(10)
        return real_write(self, data)

    monkeypatch.setattr(DirectFile, "write", held_write)
    obj = {"model": {"w": torch.randn(300, 301)}, "meta": {}}
    writer = threading.Thread(target=atomic_save, args=(obj, tmp_path / "c.pt"))
    writer.start()
    try:
        assert inside.wait(10)
        assert torch.serialization.get_crc32_options() is True
        torch.save(obj, tmp_path / "plain.pt")  # this thread, while the writer is mid-save
    finally:
        release.set()
        writer.join()
    with zipfile.ZipFile(tmp_path / "plain.pt") as z:
        assert all(i.CRC != 0 for i in z.infolist() if "/data/" in i.filename)
    with zipfile.ZipFile(tmp_path / "c.pt") as z:
        assert all(i.CRC == 0 for i in z.infolist() if "/data/" in i.filename)
