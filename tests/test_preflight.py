"""Checks before training: what would fail an epoch in is refused up front; legal but surprising combinations get one
warning line; log.step_timing reaches the console, events.jsonl and TensorBoard; a synthetic run's report says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from _reliability import FAST, cli, events

from fastft.config import FinetuneConfig
from fastft.errors import ConfigError
from fastft.preflight import check_best_metric, warnings_for


@pytest.mark.parametrize(("key", "classes"), [("auroc", 4), ("average_precision", 3), ("top5", 4), ("f1_makro", 2)])
def test_a_metric_the_task_does_not_report_is_refused(key, classes) -> None:
    with pytest.raises(ConfigError, match=f"checkpoint.best_metric: '{key}' is not a report key of a {classes}-class"):
        check_best_metric(key, classes)


@pytest.mark.parametrize(("key", "classes"), [("auroc", 2), ("top5", 5), ("loss", 3), ("f1_weighted", 4)])
def test_a_metric_the_task_reports_is_accepted(key, classes) -> None:
    check_best_metric(key, classes)


def _cfg(**changes) -> FinetuneConfig:
    cfg = FinetuneConfig()
    for dotted, value in changes.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize(
    ("changes", "world", "needles"),
    [
        ({"parallel__backend": "none"}, 2, ["parallel.backend=none with 2 processes", "not averaged"]),
        ({"features__views": 2, "data__augment": False}, 1, ["features.views=2 with data.augment=false", "augmented"]),
        ({"optim__warmup_steps": 100}, 1, ["optim.warmup_steps=100 >= the run's 50 steps", "0.0005"]),
        ({"data__loader": "synthetic"}, 1, ["data.loader=synthetic", "synthetic_data=true"]),
    ],
)
def test_each_surprising_combination_gets_one_line(changes, world, needles) -> None:
    lines = warnings_for(_cfg(**changes), world_size=world, total_steps=50)
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines


def test_the_same_settings_without_the_surprise_get_no_warning() -> None:
    cfg = _cfg(parallel__backend="ddp", features__views=2, optim__warmup_steps=49)
    assert warnings_for(cfg, world_size=2, total_steps=50) == []
    assert warnings_for(_cfg(parallel__backend="none"), world_size=1, total_steps=50) == []


def test_a_synthetic_run_with_step_timing(shapes4, tmp_path) -> None:
    rc, err = cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--data.loader=synthetic",
        "--log.step_timing=true",
        "--log.tensorboard=true",
        "--optim.max_steps=2",
        "--optim.warmup_steps=5",
        f"--run.out_dir={tmp_path}",
        "--run.name=r",
    )
    assert rc == 0, err[-3000:]
    run = tmp_path / "r"
    warnings = [ln for ln in err.splitlines() if ln.startswith("fastft: warning:")]
    assert len(warnings) == 2 and "warmup_steps=5" in warnings[0] and "synthetic" in warnings[1], warnings
    assert json.loads((run / "metrics.json").read_text())["synthetic_data"] is True
    timing = [e for e in events(run) if e["event"] == "timing"]
    assert [e["epoch"] for e in timing] == [1, 2]  # batch 32 of 48 images: one step per epoch
    assert {"data", "frozen", "trainable", "optimizer", "wall"} <= set(timing[0]) and timing[0]["trainable"] > 0
    assert "fastft: epoch 1 step time: data " in err and "fastft: epoch 2 step time: data " in err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"time/data", "time/frozen", "time/trainable", "time/optimizer"} <= set(acc.Tags()["scalars"])


def test_a_disk_cache_folder_under_a_file_is_refused_before_the_cache_is_built(shapes4, tmp_path, monkeypatch) -> None:
    import fastft.inputs

    monkeypatch.setattr(fastft.inputs, "_cached_loaders", lambda *a, **k: pytest.fail("cache built before the check"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--features.cache=disk",
        f"--features.dir={blocker / 'cache'}",
        f"--run.out_dir={tmp_path / 'runs'}",
    )
    line = [ln for ln in err.splitlines() if ln.startswith("fastft: error")]
    assert rc == 2 and len(line) == 1 and "features.dir" in line[0] and "Not a directory" in line[0], err[-2000:]
    assert not (tmp_path / "runs").exists()
