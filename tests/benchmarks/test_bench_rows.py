"""The suites' probe-wall and save-gap rows (fastft.benchmark.probe_wall / save_gap): one real smoke run of both,
whose report carries each figure and each ratio as the quotient of its parts; the step intervals around saves; `--only`
and the time budget."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import pytest

from fastft.benchmark import harness, probe_wall, report, save_gap, suites
from fastft.benchmark.cli import add_arguments


def _args(out: Path, *extra: str) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(["--suite", "smoke", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory) -> tuple[dict, str]:
    """The smoke suite's two rows, really measured (resnet18, 32 px): the JSON as written, and the markdown."""
    tmp = tmp_path_factory.mktemp("rows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp / "cache"))  # the generated JPEGs
        harness.run(_args(tmp / "res", "--only", "probe-wall,save-gap", "--no-latest"))
    (json_path,) = (tmp / "res").glob("*.json")
    doc = json.loads(json_path.read_text())
    report.validate(doc)
    return doc, json_path.with_suffix(".md").read_text()


def _positive(xs: list[float]) -> bool:
    return bool(xs) and all(math.isfinite(x) and x > 0 for x in xs)


def test_smoke_probe_wall_row_is_its_parts_quotient(smoke_rows) -> None:
    doc, md = smoke_rows
    p = doc["probe_wall"]
    assert p["status"] == "ok" and (p["model"], p["epochs"], p["pairs"]) == ("resnet18", 2, 1)
    assert p["images"] == 8 + 4 and p["image_size"] == 32 and p["device"] == "cpu"
    assert _positive(p["forward_pass_s"]) and _positive(p["probe_wall_s"]) and len(p["forward_pass_s"]) == 1
    (f,), (w,) = p["forward_pass_s"], p["probe_wall_s"]
    assert p["ratios"] == [pytest.approx(w / f)] and p["ratio_median"] == pytest.approx(w / f)
    assert p["met"] is (w / f <= 1.2)
    # The breakdown is the median pair's run: its parts add up to that run's wall time; the cache build is in it.
    parts = dict(p["breakdown_s"])
    cache = "feature cache build (the run's forward pass)"
    assert sum(parts.values()) == pytest.approx(w)
    assert parts[cache] > 0 and parts["2 epochs' training loops"] > 0
    assert f"| 0 | {f:.2f} | {w:.2f} | {w / f:.2f} |" in md
    assert f"**Median probe / forward pass: {w / f:.2f}** (target <= 1.2: {'met' if w / f <= 1.2 else 'missed'})" in md
    assert f"| {cache} | {parts[cache]:.2f} | {parts[cache] / w:.0%} |" in md
    (t,) = [t for t in doc["targets"] if t["name"] == "probe_wall_vs_forward_pass"]
    assert t["value"] == pytest.approx(w / f) and t["threshold"] == "<= 1.2"


def test_smoke_save_gap_row_is_its_parts_quotient(smoke_rows) -> None:
    doc, md = smoke_rows
    g = doc["save_gap"]
    assert g["status"] == "ok" and (g["steps"], g["every"], g["batch_size"]) == (7, 3, 2)
    for mode in ("sync", "background"):
        m = g[mode]
        # 7 steps, a save after steps 3 and 6: intervals opened by steps 3 and 6 hold a save; 2 and 5 are normal.
        assert len(m["at_save_s"]) == 2 and len(m["normal_s"]) == 2 and len(m["next_step_s"]) == 1
        assert _positive(m["at_save_s"]) and _positive(m["normal_s"]) and m["last_pt_bytes"] > 10e6
        assert m["normal_median_s"] == pytest.approx(statistics.median(m["normal_s"]))
        assert m["at_save_median_s"] == pytest.approx(statistics.median(m["at_save_s"]))
        assert m["ratio_at_save"] == pytest.approx(m["at_save_median_s"] / m["normal_median_s"])
        assert f"| {mode} | {m['normal_median_s']:.3f} s |" in md
    bg = g["background"]
    assert g["ratio"] == pytest.approx(statistics.median(bg["at_save_s"]) / statistics.median(bg["normal_s"]))
    assert g["ratio_sync"] == pytest.approx(g["sync"]["at_save_median_s"] / g["sync"]["normal_median_s"])
    assert g["met"] is (g["ratio"] <= 1.1)
    head = f"**Step at a save / normal step, background write: {g['ratio']:.2f}** (sync write: "
    assert f"{head}{g['ratio_sync']:.2f}" in md
    (t,) = [t for t in doc["targets"] if t["name"] == "save_step_vs_normal_step"]
    assert t["value"] == pytest.approx(g["ratio"]) and t["threshold"] == "<= 1.1"
    # --only picked the two rows and nothing else.
    assert doc["cases"] == [] and doc["headline"] is None


def test_step_intervals_split_into_save_next_and_normal() -> None:
    # Steps 1..7 saving every 3; interval k is opened by step k's after_step.
    intervals = [0.5, 1.0, 3.0, 1.5, 1.2, 2.0]
    marks = [10.0]
    for dt in intervals:
        marks.append(marks[-1] + dt)
    g = save_gap.gaps(marks, 3)
    assert g["at_save_s"] == pytest.approx([3.0, 2.0]) and g["at_save_median_s"] == pytest.approx(2.5)
    assert g["normal_s"] == pytest.approx([1.0, 1.2]) and g["normal_median_s"] == pytest.approx(1.1)
    assert g["ratio_at_save"] == pytest.approx(2.5 / 1.1)
    assert g["next_step_s"] == pytest.approx([1.5]) and g["ratio_next_step"] == pytest.approx(1.5 / 1.1)
    with pytest.raises(ValueError, match="no step away from a save"):
        save_gap.gaps(marks[:4], 2)


def _fake_rows(monkeypatch) -> list[str]:
    calls: list[str] = []

    def fake(name: str):
        def run_row(spec, s, **kw):
            calls.append(name)
            raise RuntimeError("stop here")  # recorded as the row's error; nothing measured

        return run_row

    monkeypatch.setattr(probe_wall, "run_row", fake("probe_wall"))
    monkeypatch.setattr(save_gap, "run_row", fake("save_gap"))
    return calls


@pytest.mark.parametrize(
    ("only", "expected"),
    [("save-gap", ["save_gap"]), ("probe-wall", ["probe_wall"]), ("timm", []), ("probe-wall,save-gap", None)],
)
def test_only_selects_the_rows_by_name(monkeypatch, tmp_path, only, expected) -> None:
    calls = _fake_rows(monkeypatch)
    doc = harness.run(_args(tmp_path / "res", "--only", only, "--no-latest"))
    assert calls == (expected if expected is not None else ["probe_wall", "save_gap"])
    for key in ("probe_wall", "save_gap"):
        if key in calls:
            assert doc[key]["status"] == "error" and doc[key]["reason"] == "RuntimeError: stop here"
        else:
            assert doc[key] is None
    assert doc["cases"] == [] and doc["headline"] is None


def test_a_row_that_does_not_fit_the_time_budget_is_skipped_with_its_reason(monkeypatch, tmp_path) -> None:
    calls = _fake_rows(monkeypatch)
    suite = suites.get_suite("smoke")
    suite.probe_wall.estimate_s, suite.save_gap.estimate_s = 1e-6, 3600.0
    monkeypatch.setitem(suites.SUITES, "smoke", lambda: suite)
    doc = harness.run(_args(tmp_path / "res", "--only", "probe-wall,save-gap", "--time-budget", "600"))
    assert calls == ["probe_wall"]  # fits: started
    g = doc["save_gap"]
    assert g["status"] == "skipped" and "time budget of 600s" in g["reason"] and "about 3600s" in g["reason"]
    (t,) = [t for t in doc["targets"] if t["name"] == "save_step_vs_normal_step"]
    assert t["met"] is None and t["value"] is None
    md = next(p for p in (tmp_path / "res").glob("*.md") if p.name != "LATEST.md").read_text()
    assert f"skipped: {g['reason']}" in md and "**not measured**: step time at a checkpoint save" in md


def test_a_timed_run_without_the_fused_step_builds_torchs_default(shapes4, tmp_path, monkeypatch) -> None:
    """`timed_run(fused=False)` (the optimizer comparison of benchmarks/save_gap.py) replaces fastft's step-kernel
    choice, whatever arguments fastft passes it: the run trains, and its AdamW is built without `fused`."""
    import torch

    built: list = []

    class Spy(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:
            built.append(kwargs.get("fused"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Spy)
    cpu = torch.device("cpu")
    kw = {"model": "resnet18", "steps": 3, "every": 2, "size": 32, "batch": 4, "optim": "adamw", "workers": 0}
    cfg = save_gap.gap_config(shapes4, tmp_path, "unfused", loader="torch", precision="fp32", device=cpu, **kw)
    marks = save_gap.timed_run(cfg, background=True, fused=False, device=cpu)
    assert len(marks) == 3 and built == [None]
