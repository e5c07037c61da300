"""The checkpoint snapshot (fastft.saver.Snapshot): a real copy, taken into the previous save's buffers where the
shapes allow (the write of that save is done by then), fresh ones where they do not."""

from __future__ import annotations

import torch

from fastft.saver import Snapshot


def test_snapshots_are_copies_that_later_changes_do_not_reach_and_reuse_the_last_buffers() -> None:
    w = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    state = {"model": {"w": w, "n": torch.tensor(3)}, "opt": [{"m": torch.zeros(7)}], "step": 4, "name": "last.pt"}
    snap = Snapshot()
    first = snap.take(state)
    assert first["step"] == 4 and first["name"] == "last.pt"
    assert first["model"]["w"].stride() == w.stride()  # the layout is kept: the file holds what the model held
    kept = first["model"]["w"].clone()
    w.add_(1.0)
    state["opt"][0]["m"].fill_(2.0)
    assert torch.equal(first["model"]["w"], kept) and torch.equal(first["opt"][0]["m"], torch.zeros(7))

    second = snap.take(state)  # the first save's write is done: its buffers take this one
    assert torch.equal(second["model"]["w"], w) and torch.equal(second["opt"][0]["m"], torch.full((7,), 2.0))
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()
    assert second["model"]["w"].data_ptr() != w.data_ptr()

    state["opt"][0]["m"] = torch.ones(9)  # a shape that changed (an unfreeze adds state): a fresh buffer
    third = snap.take(state)
    assert torch.equal(third["opt"][0]["m"], torch.ones(9))
    assert third["opt"][0]["m"].data_ptr() != state["opt"][0]["m"].data_ptr()


def test_large_cpu_snapshot_buffers_are_page_aligned_so_the_writer_sends_them_without_a_copy() -> None:
    from fastft.direct_file import ALIGN

    state = {"w": torch.randn(256, 128, 3, 3).contiguous(memory_format=torch.channels_last), "b": torch.randn(5)}
    snap = Snapshot()
    for _ in range(2):  # fresh buffers, then the reused ones
        out = snap.take(state)
        assert out["w"].data_ptr() % ALIGN == 0 and out["w"].stride() == state["w"].stride()
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
