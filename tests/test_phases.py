"""fastft.timing.Phases: the set-up / teardown breakdown charges each phase the time it took, in order."""

from __future__ import annotations

import time

import pytest

from fastft.timing import Phases


def test_laps_charge_the_time_since_the_previous_one_and_repeat_phases_add_up() -> None:
    ph = Phases()
    time.sleep(0.05)
    ph.lap("a")
    time.sleep(0.02)
    ph.lap("b")
    ph.restart()
    time.sleep(0.2)  # between restart and the next lap only
    ph.restart()
    time.sleep(0.03)
    ph.lap("a")
    with ph("c"):
        time.sleep(0.01)
    out = ph.result()
    assert list(out) == ["a", "b", "c", "total"]
    assert 0.08 <= out["a"] < 0.2 and 0.02 <= out["b"] < 0.15 and 0.01 <= out["c"] < 0.1
    assert out["total"] == pytest.approx(out["a"] + out["b"] + out["c"], abs=1e-3)
    assert ph.describe().startswith(f"{out['total']:.1f} s (a ")
