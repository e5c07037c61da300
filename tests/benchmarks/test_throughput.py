"""The throughput harness itself (fastft/benchmark): warm-up is never timed, ratios come from one run's own
measurements, cached modes are set against the host's memory bandwidth, and the results document keeps a stable schema.
Mock timings make the arithmetic exact; one tiny real run checks the wiring."""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastft.benchmark import analysis, baseline, cases, harness, headline, measure, report, suites
from fastft.benchmark.cli import add_arguments
from fastft.benchmark.suites import Block, Case, Headline, Settings, Suite


def _args(tmp_path: Path, **kw) -> argparse.Namespace:
    args = add_arguments(argparse.ArgumentParser()).parse_args(["--suite", "smoke", "--out", str(tmp_path / "results")])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


# --------------------------------------------------------------------------------------------------------------------
# Warm-up is excluded


def test_time_calls_times_only_after_warmup_and_syncs_around_each_block() -> None:
    events: list[str] = []
    calls = {"n": 0}

    def fn() -> None:
        calls["n"] += 1
        events.append("call")
        if calls["n"] <= 2:  # a slow first-call (kernel selection, allocation) that must not be timed
            time.sleep(0.2)

    secs = measure.time_calls(fn, warmup=2, iters=3, repeats=3, sync=lambda: events.append("sync"))
    assert len(secs) == 3 and max(secs) < 0.1
    # Warm-up calls untimed, then sync | iters calls | sync for every repeat: queued device work is never missed.
    assert events == ["call"] * 2 + (["sync"] + ["call"] * 3 + ["sync"]) * 3
    calls["n"] = 0
    assert measure.time_calls(fn, warmup=0, iters=1, repeats=3, sync=lambda: None)[0] > 0.15  # would be caught


def test_time_calls_warmup_seconds_extends_the_untimed_calls() -> None:
    calls = []
    fn = lambda: (calls.append(1), time.sleep(0.01))
    measure.time_calls(fn, warmup=1, iters=1, repeats=2, sync=lambda: None, warmup_s=0.1)
    assert len(calls) - 2 >= 9  # ~0.1 s of warm-up calls before the 2 timed ones


def _epoch(wall: float, images: int = 32, frozen: float | None = None) -> dict:
    frozen = wall * 0.8 if frozen is None else frozen
    return {
        "data": wall * 0.05,
        "frozen": frozen,
        "trainable": wall * 0.1,
        "optimizer": wall * 0.01,
        "wall": wall,
        "images": images,
    }


def test_summarise_epochs_excludes_the_warmup_epoch_even_past_ten_epochs() -> None:
    # Keys inserted out of order, and "epoch10" sorts before "epoch2" as a string: the warm-up is epoch0 by number.
    walls = {0: 40.0, **{i: 1.0 for i in range(1, 11)}, 2: 2.0, 3: 0.5}
    timings = {f"epoch{i}": _epoch(walls[i], frozen=0.4) for i in sorted(walls, reverse=True)}
    timings["epoch0"]["frozen"] = 39.0
    out = measure.summarise_epochs(timings, warmup=1, batch_size=8)
    assert out["images_per_s"] == pytest.approx(32.0)  # median of the timed epochs, epoch0 (0.8 img/s) excluded
    assert out["spread"]["min"] == pytest.approx(16.0) and out["spread"]["max"] == pytest.approx(64.0)
    assert out["first_epoch_images_per_s"] == pytest.approx(0.8)
    assert out["epochs_images_per_s"][0] == pytest.approx(0.8) and len(out["epochs_images_per_s"]) == 11
    # 4 steps per epoch: frozen 0.4 s -> 100 ms per step; epoch0's 39 s never enters the median.
    assert out["breakdown_ms_per_step"]["frozen"] == pytest.approx(100.0)
    assert out["steps_per_epoch"] == 4
    assert set(out["breakdown_ms_per_step"]) == set(measure.BREAKDOWN)


def test_summarise_epochs_breakdown_per_step_with_world_size_and_other() -> None:
    # Two ranks, batch 8 each: 32 global images = 2 steps. `other` is what the four segments do not cover.
    timings = {
        f"epoch{i}": {"data": 0.1, "frozen": 0.6, "trainable": 0.2, "optimizer": 0.0, "wall": 1.0, "images": 32}
        for i in range(4)
    }
    out = measure.summarise_epochs(timings, warmup=1, batch_size=8, world=2, comm_s_per_step=0.003)
    b = out["breakdown_ms_per_step"]
    assert b["frozen"] == pytest.approx(300.0) and b["other"] == pytest.approx(50.0)
    assert b["communication"] == pytest.approx(3.0)


def test_summarise_epochs_refuses_when_nothing_is_left_after_warmup() -> None:
    with pytest.raises(ValueError, match="warm-up"):
        measure.summarise_epochs({"epoch0": _epoch(1.0)}, warmup=1, batch_size=8)


# --------------------------------------------------------------------------------------------------------------------
# Ratios come from the same run


def _measurement(i: int, rate: float, run_id: str = "run-a", key: str = "m/bf16/bs8/32px") -> dict:
    return {
        "id": i,
        "when": f"m{i}",
        "key": key,
        "run_id": run_id,
        "images_per_s": rate,
        "repeats_images_per_s": [rate] * 3,
        "spread": {},
    }


def _doc(measurements: list[dict], case_ids: list[int], *, case_run: str = "run-a") -> dict:
    case = {
        "name": "m linear",
        "status": "ok",
        "config": {"model": "m", "cache": "off"},
        "run_id": case_run,
        "images_per_s": 75.0,
        "first_epoch_images_per_s": 25.0,
        "limit_key": "m/bf16/bs8/32px",
        "limit_ids": case_ids,
    }
    return {
        "run_id": "run-a",
        "limit_measurements": measurements,
        "limits": [],
        "headline": None,
        "cases": [case],
        "baselines": [{"model": "m", "run_id": "run-a", "images_per_s": 30.0}],
    }


def test_attach_ratios_uses_the_measurements_taken_around_the_mode() -> None:
    doc = _doc([_measurement(0, 1000.0), _measurement(1, 50.0), _measurement(2, 200.0)], [1, 2])
    analysis.attach_ratios(doc)
    case = doc["cases"][0]
    # median of the 6 repeats of measurements 1 and 2 = 125; measurement 0 (taken earlier) is not used.
    assert case["limit_images_per_s"] == pytest.approx(125.0)
    assert case["ratio_to_limit"] == pytest.approx(75.0 / 125.0)
    assert case["first_epoch_ratio_to_limit"] == pytest.approx(25.0 / 125.0)
    assert case["ratio_to_baseline"] == pytest.approx(75.0 / 30.0)
    (summary,) = doc["limits"]  # the run's summary of that key: the median over all three measurements' repeats
    assert summary["images_per_s"] == pytest.approx(200.0) and summary["measurement_ids"] == [0, 1, 2]


def test_ratios_refuse_measurements_from_another_run() -> None:
    with pytest.raises(ValueError, match="across runs"):
        measure.ratio({"run_id": "a", "images_per_s": 1.0}, {"run_id": "b", "images_per_s": 2.0})
    doc = _doc([_measurement(0, 100.0), _measurement(1, 100.0)], [0, 1], case_run="run-b")
    with pytest.raises(ValueError, match="across runs"):
        analysis.attach_ratios(doc)
    doc = _doc([_measurement(0, 100.0), _measurement(1, 100.0, run_id="run-b")], [0, 1])
    with pytest.raises(ValueError, match="same"):
        analysis.attach_ratios(doc)


def test_cached_mode_is_set_against_memory_bandwidth_not_the_backbone() -> None:
    doc = _doc([_measurement(0, 100.0), _measurement(1, 100.0)], [0, 1])
    doc["cases"][0]["config"]["cache"] = "memory"
    doc["cases"][0]["cache_row_bytes"] = 1024
    doc["memcpy"] = {"run_id": "run-a", "bytes_per_s": 2e9}
    analysis.attach_ratios(doc)
    case = doc["cases"][0]
    assert case["ratio_to_limit"] is None and case["bound"] == "host memory bandwidth"
    assert case["cache_bytes_per_s"] == pytest.approx(75.0 * 1024)
    assert case["ratio_to_memcpy"] == pytest.approx(75.0 * 1024 / 2e9)
    assert case["first_epoch_ratio_to_limit"] is None  # epoch 0 trains from the cache too (built before it)
    assert case["ratio_to_baseline"] == pytest.approx(75.0 / 30.0)  # a multiple of the seed loop stays meaningful
    assert report.limit_cell(case) == "0.08 MB/s = 3.8e-05 x memcpy"
    doc["memcpy"]["run_id"] = "run-b"
    with pytest.raises(ValueError, match="across runs"):
        analysis.attach_ratios(doc)


def test_measure_memcpy_reports_bytes_copied_per_second(monkeypatch) -> None:
    copies = []

    def time_calls(fn, **kw):
        fn()
        copies.append(kw)
        return [0.5, 0.25, 1.0]

    monkeypatch.setattr(measure, "time_calls", time_calls)
    m = measure.measure_memcpy(run_id="r", mib=4, repeats=3)
    assert copies and m["buffer_bytes"] == 4 << 20 and m["run_id"] == "r"
    assert m["bytes_per_s"] == pytest.approx((4 << 20) / 0.5)  # the median copy time


# resnet18: the pooled 512 features; mobilenet_v3_small: the head is the last Linear (classifier.3), so the cache holds
# the 1024 outputs of classifier.0 - 2.
@pytest.mark.parametrize(
    ("model", "dtype", "expected"), [("resnet18", "fp16", 512 * 2), ("mobilenet_v3_small", "fp32", 1024 * 4)]
)
def test_cache_row_bytes_is_the_prefix_output_at_the_stored_dtype(tmp_path, model, dtype, expected) -> None:
    s = Settings(batch_size=4, image_size=32, workers=0, train_images=4, val_images=4)
    cfg = cases.case_config(
        Case("linear/cache", model, loader="torch", cache="memory"),
        s,
        tmp_path,
        tmp_path,
        epochs=1,
        device=measure.resolve_device("cpu"),
    )
    cfg.features.dtype = dtype
    assert cases.cache_row_bytes(cfg) == expected


def test_ratio_refuses_a_limit_of_another_precision() -> None:
    doc = _doc([_measurement(0, 100.0, key="m/fp32/bs8/32px"), _measurement(1, 100.0, key="m/fp32/bs8/32px")], [0, 1])
    with pytest.raises(ValueError, match="compared with"):
        analysis.attach_ratios(doc)


# --------------------------------------------------------------------------------------------------------------------
# A whole run with mocked timings: bracketing, targets and the schema


@pytest.fixture()
def mocked(monkeypatch, tmp_path):
    """The harness with fastft, the seed loop and the limit replaced by deterministic fakes."""
    state = {"limit_calls": 0}
    suite = Suite(
        "smoke",
        Settings(batch_size=8, image_size=32, workers=0, train_images=16, val_images=8, device="cpu"),
        [
            Block(
                "resnet18",
                [
                    Case("linear/synthetic", "resnet18"),
                    Case("linear/synthetic fp32", "resnet18", precision="fp32"),
                    Case("full/synthetic", "resnet18", "full"),
                ],
                baseline_epochs=4,
            )
        ],
        Headline("resnet18", epochs=10, train_images=16, val_images=8, first_epoch_repeats=3, dali_first_epoch=False),
    )
    monkeypatch.setitem(suites.SUITES, "smoke", lambda: copy.deepcopy(suite))
    monkeypatch.setattr(cases, "bench_folder", lambda *a, **k: tmp_path)
    monkeypatch.setattr(measure, "precision_name", lambda dtype, device: "fp32" if dtype == "fp32" else "bf16")
    monkeypatch.setattr(headline, "decode_ms_per_image", lambda *a, **k: 2.0)

    def measure_limit(model, *, precision, s, device, run_id, warmup_s=0.0):
        state["limit_calls"] += 1
        state.setdefault("warmups", []).append(warmup_s)
        rate = 100.0 * state["limit_calls"]  # every measurement differs: which ones a ratio uses is visible
        size = measure.crop_size(model, s.image_size)
        key = measure.limit_key(model, measure.precision_name(precision, device), s.batch_size, size)
        return {
            "key": key,
            "run_id": run_id,
            "model": model,
            "precision": precision,
            "batch_size": s.batch_size,
            "image_size": size,
            "channels_last": True,
            "images_per_s": rate,
            "spread": {"min": rate, "max": rate, "rel": 0.0},
            "repeats_images_per_s": [rate] * 3,
            "warmup_iters": 1,
            "iters_per_repeat": 1,
        }

    def finetune_quiet(cfg):
        n = cfg.optim.epochs
        timings = {f"epoch{i}": _epoch(10.0 if i == 0 else 0.5, images=16) for i in range(n)}
        lines = ["fastft: precision bf16 (auto), compile none, split head, backend none, world 1, device cpu"]
        cache = {"wall_s": 3.0, "images": 24, "train": "built", "val": "built"} if cfg.features.cache != "off" else {}
        return (
            SimpleNamespace(timings=timings, metrics={"top1": 0.5}, feature_cache=cache),
            lines,
            4.0 + sum(t["wall"] for t in timings.values()),
        )

    def run_seed(root, *, model_name, epochs, batch_size, workers, image_size, device):
        epoch = {"seconds": 10.0, "images": 16, "images_per_s": 1.6}
        return {
            "total_s": 100.0 * epochs / 10,
            "epochs": [epoch] * epochs,
            "top1": 0.25,
            "images_per_epoch": 16,
            "model": model_name,
            "batch_size": batch_size,
            "workers": workers,
            "image_size": 32,
            "settings": {},
        }

    monkeypatch.setattr(measure, "measure_limit", measure_limit)
    monkeypatch.setattr(measure, "finetune_quiet", finetune_quiet)
    monkeypatch.setattr(baseline, "run_seed", run_seed)
    return state


def test_mocked_run_brackets_every_mode_with_its_own_limit_measurements(mocked, tmp_path) -> None:
    doc = harness.run(_args(tmp_path))
    m = {x["id"]: x for x in doc["limit_measurements"]}  # measurement #i reads 100 * (i + 1) img/s
    # The side-by-side run comes first. Each first-epoch variant is 3 fresh runs, each between two measurements
    # (limit, run, limit, run, limit, run, limit); the in-memory variant at the same size starts from the JPEG one's
    # last measurement (#3); the preset-size (224 px) variant needs its own.
    jpeg, synthetic, preset = doc["headline"]["first_epochs"]
    assert [r["limit_ids"] for r in jpeg["repeats"]] == [[0, 1], [1, 2], [2, 3]]
    assert [r["limit_ids"] for r in synthetic["repeats"]] == [[3, 4], [4, 5], [5, 6]]
    assert [r["limit_ids"] for r in preset["repeats"]] == [[7, 8], [8, 9], [9, 10]]
    assert preset["image_size"] == 224 and m[7]["key"].endswith("/224px") and m[6]["key"].endswith("/32px")
    # Per-run ratios 1.6 / (150, 250, 350): the median is the middle run's, against its own bracketing limits.
    assert [r["ratio_to_limit"] for r in jpeg["repeats"]] == pytest.approx([1.6 / 150, 1.6 / 250, 1.6 / 350])
    assert jpeg["ratio_to_limit"] == pytest.approx(1.6 / 250.0)
    assert preset["ratio_to_limit"] == pytest.approx(1.6 / 950.0)
    # Then every mode between its own measurements: bf16 (#11, #12), fp32 needs fp32 ones (#13, #14), full (#15, #16).
    bf16, fp32, full = doc["cases"]
    assert bf16["limit_ids"] == [11, 12] and fp32["limit_ids"] == [13, 14] and full["limit_ids"] == [15, 16]
    assert m[13]["key"].split("/")[1] == "fp32" and fp32["limit_key"] == m[13]["key"]
    assert bf16["ratio_to_limit"] == pytest.approx(32.0 / 1250.0)  # 16 images / 0.5 s vs median(1200, 1300)
    # The first measurement of each key (32 px bf16 #0, 224 px #7, fp32 #13) warms up longer; no other does.
    assert [i for i, w in enumerate(mocked["warmups"]) if w > 0] == [0, 7, 13]
    assert full["ratio_to_limit"] == pytest.approx(32.0 / 1650.0)
    assert bf16["ratio_to_baseline"] == pytest.approx(32.0 / 1.6)  # the seed loop of the side-by-side run
    assert all(c["run_id"] == doc["run_id"] for c in doc["cases"])
    assert all(x["run_id"] == doc["run_id"] for x in doc["limit_measurements"])
    # fastft's cached run, timed before and after the seed loop: (4 s + 10 s warm-up epoch + 9 x 0.5 s) / 100 s.
    cached = doc["headline"]["fastft_cached"]
    assert len(cached["runs"]) == 2 and cached["wall_s"] == pytest.approx(18.5)
    assert doc["headline"]["time_ratio_fastft_over_baseline"] == pytest.approx(18.5 / 100.0)


def test_mocked_run_reports_targets_honestly(mocked, tmp_path) -> None:
    doc = harness.run(_args(tmp_path))
    firsts = [x for x in doc["targets"] if x["name"].startswith("first_epoch_vs_limit")]
    assert len(firsts) == 3 and all(x["met"] is False and "epoch 0 split" in x["why"] for x in firsts)
    # JPEG input: the decode cost the limit leaves out, as a ceiling (2 ms vs 1000 * cores / limit); in memory: not.
    assert "2.0 CPU-ms per image" in firsts[0]["why"] and "CPU-ms" not in firsts[1]["why"]
    t = {x["name"]: x for x in doc["targets"]}
    assert t["cached_probe_time_vs_baseline"]["value"] == pytest.approx(0.185)
    assert t["cached_probe_time_vs_baseline"]["met"] is False
    assert "cache build 3.0s" in t["cached_probe_time_vs_baseline"]["why"]
    md = next(p for p in (tmp_path / "results").glob("*.md") if p.name != "LATEST.md").read_text()
    assert "**MISSED**" in md and "0.185" in md


def test_results_files_follow_the_schema(mocked, tmp_path) -> None:
    doc = harness.run(_args(tmp_path))
    out = tmp_path / "results"
    (json_path,) = out.glob("*.json")
    stem = f"{report.hardware_slug(doc['hardware'])}-{doc['date'][:10].replace('-', '')}"
    assert json_path.name == f"{stem}.json" and (out / f"{stem}.md").is_file() and (out / "LATEST.md").is_file()
    on_disk = json.loads(json_path.read_text())
    assert on_disk["schema_version"] == report.SCHEMA_VERSION == 1
    report.validate(on_disk)
    for kind, keys in (("document", on_disk), ("hardware", on_disk["hardware"])):
        assert set(report.REQUIRED_KEYS[kind]) <= set(keys)
    for case in on_disk["cases"]:
        assert set(report.REQUIRED_KEYS["case"]) | set(report.REQUIRED_KEYS["case_ok"]) <= set(case)
    # Stamped: config, versions, CPU/GPU model and count, in both files.
    assert {"torch", "torchvision", "fastft", "python"} <= set(on_disk["versions"])
    assert on_disk["settings"]["batch_size"] == 8 and on_disk["command"].startswith("fastft bench --suite smoke")
    md = (out / f"{stem}.md").read_text()
    assert on_disk["hardware"]["cpu_model"] in md and on_disk["versions"]["torch"] in md and on_disk["run_id"] in md
    assert "| model | mode | input |" in (out / "LATEST.md").read_text()


@pytest.mark.parametrize("breakage", ["version", "top", "case", "limit"])
def test_validate_rejects_documents_that_break_the_schema(mocked, tmp_path, breakage) -> None:
    doc = harness.run(_args(tmp_path))
    report.validate(doc)
    bad = copy.deepcopy(doc)
    if breakage == "version":
        bad["schema_version"] = 2
    elif breakage == "top":
        del bad["targets"]
    elif breakage == "case":
        del bad["cases"][0]["breakdown_ms_per_step"]
    else:
        del bad["limits"][0]["images_per_s"]
    with pytest.raises(ValueError):
        report.validate(bad)


def test_time_budget_skips_modes_but_keeps_the_document_valid(mocked, tmp_path) -> None:
    doc = harness.run(_args(tmp_path, time_budget=1e-9))
    assert [c["status"] for c in doc["cases"]] == ["skipped"] * 3
    assert doc["headline"] is not None  # the side-by-side run goes first and is never cut
    report.validate(doc)
    doc = harness.run(_args(tmp_path, only="nothing matches"))
    assert doc["cases"] == [] and doc["headline"] is None and all(t["met"] is None for t in doc["targets"])
    report.validate(doc)


# --------------------------------------------------------------------------------------------------------------------
# One real, tiny run through fastft and the seed loop


def test_real_smoke_run_writes_consistent_results(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the generated JPEGs
    suite = Suite(
        "smoke",
        Settings(
            batch_size=4,
            image_size=32,
            workers=0,
            train_images=8,
            val_images=4,
            limit_warmup=1,
            limit_iters=1,
            limit_first_warmup_s=0.0,
            device="cpu",
        ),
        [Block("resnet18", [Case("linear/cache", "resnet18", loader="torch", cache="memory")], baseline_epochs=2)],
        Headline(
            "resnet18",
            epochs=2,
            train_images=8,
            val_images=4,
            preset_first_epoch=False,
            first_epoch_repeats=1,
            dali_first_epoch=False,
        ),
    )
    monkeypatch.setitem(suites.SUITES, "smoke", lambda: suite)
    doc = harness.run(_args(tmp_path))
    (case,) = doc["cases"]
    assert case["status"] == "ok", case.get("reason")
    assert len(case["epochs_images_per_s"]) == 4 and case["cache_build_s"] is not None
    # A cached mode's epochs never run the backbone (the cache is built before epoch 0): no ratio to its limit, but
    # its feature bytes/s against this run's host memcpy bandwidth (resnet18's pooled features: 512 values, fp16).
    assert case["ratio_to_limit"] is None and case["first_epoch_ratio_to_limit"] is None
    assert case["cache_row_bytes"] == 512 * 2
    bw = doc["memcpy"]["bytes_per_s"]
    assert bw > 1e8 and doc["memcpy"]["run_id"] == doc["run_id"]
    assert case["ratio_to_memcpy"] == pytest.approx(case["images_per_s"] * 1024 / bw)
    md = next(p for p in (tmp_path / "results").glob("*.md") if p.name != "LATEST.md").read_text()
    assert f"= {case['ratio_to_memcpy']:.2g} x memcpy" in md and f"{bw / 1e9:.2f} GB/s" in md
    h = doc["headline"]
    assert h["time_ratio_fastft_over_baseline"] == pytest.approx(h["fastft_cached"]["wall_s"] / h["baseline"]["wall_s"])
    assert len(h["baseline"]["epoch_wall_s"]) == 2
    assert [len(r["epoch_wall_s"]) for r in h["fastft_cached"]["runs"]] == [2, 2]
    for first in h["first_epochs"]:
        (run,) = first["repeats"]
        lim = measure.combine_limits([doc["limit_measurements"][i] for i in run["limit_ids"]])
        assert first["ratio_to_limit"] == pytest.approx(run["images_per_s"] / lim["images_per_s"])
    report.validate(json.loads(next((tmp_path / "results").glob("*.json")).read_text()))


def test_fastft_bench_subcommand_drives_the_same_harness(monkeypatch, tmp_path) -> None:
    from fastft.benchmark import cli as bench

    seen = {}
    monkeypatch.setattr(harness, "run", lambda args: seen.setdefault("args", args))
    parser = argparse.ArgumentParser(prog="fastft")
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--suite", "smoke", "--out", str(tmp_path), "--time-budget", "5"])
    assert bench.run_bench(args) == 0
    assert (seen["args"].suite, seen["args"].out, seen["args"].time_budget) == ("smoke", str(tmp_path), 5.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--suite", "nope"])


@pytest.mark.slow
def test_world_size_two_mode_runs_the_package_worker_under_torchrun(monkeypatch, tmp_path) -> None:
    # The ranks run `python -m fastft.benchmark.worker` from a scratch cwd: no source tree needed beside them.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    s = Settings(batch_size=4, image_size=32, workers=0, train_images=8, val_images=4, repeats=1)
    entry = cases.run_case(
        Case("linear/synthetic world 2", "resnet18", world=2),
        s,
        device=measure.resolve_device("cpu"),
        run_id="r",
        work=tmp_path,
    )
    # resnet18's head at the bench folder's 4 classes: 512 x 4 + 4 fp32 gradients all-reduced per step.
    assert entry["comm_bytes_per_step"] == 4 * (512 * 4 + 4)
    assert entry["breakdown_ms_per_step"]["communication"] > 0 and len(entry["epochs_images_per_s"]) == 2
    assert entry["steps_per_epoch"] == 1  # 8 images / (batch 4 x 2 ranks)
