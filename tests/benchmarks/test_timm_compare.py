"""The timm comparison in `fastft bench`: both sides train the same parameters, runs alternate in pairs, and the ratio
and its target are fastft / timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastft.benchmark import analysis, report, timm_compare
from fastft.benchmark.suites import Settings, TimmComparison

SETTINGS = Settings(batch_size=8, image_size=32, workers=0, train_images=8, val_images=4, device="cpu")


def test_partial_fine_tune_trains_the_same_parameters_on_both_sides() -> None:
    from fastft.config import ModelConfig
    from fastft.model import build_model, freeze

    ours = build_model(ModelConfig(name="resnet18", weights="none"), 4, image_size=32, pretrained_ok=False)
    freeze(ours, SETTINGS.partial_freeze)
    theirs = timm_compare.timm_model("resnet18", SETTINGS.partial_freeze, num_classes=4)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert {n for n, p in theirs.named_parameters() if p.requires_grad} == trainable
    assert trainable and all(n.startswith(("layer4.", "fc.")) for n in trainable)
    # The frozen stages' BatchNorm no longer updates its statistics (fastft runs its frozen prefix in eval mode).
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in theirs.layer3.modules())
    full = timm_compare.timm_model("resnet18", "none", num_classes=4)
    assert all(p.requires_grad for p in full.parameters())


def test_pairs_alternate_and_the_ratio_is_fastft_over_timm(monkeypatch, tmp_path) -> None:
    calls: list[tuple[str, str]] = []
    rates = {"fastft": iter([30.0, 33.0, 36.0, 10.0, 11.0, 12.0]), "timm": iter([20.0, 30.0, 24.0, 10.0, 10.0, 10.0])}

    def fake(side: str):
        def run(t, s, root, *, mode, **kw) -> float:
            calls.append((mode, side))
            return next(rates[side])

        return run

    monkeypatch.setattr(timm_compare.cases, "bench_folder", lambda *a: Path(tmp_path))
    monkeypatch.setattr(timm_compare, "fastft_img_s", fake("fastft"))
    monkeypatch.setattr(timm_compare, "timm_img_s", fake("timm"))
    t = TimmComparison(model="resnet18", timm_model="resnet18", pairs=3, precision="fp32")
    entry = timm_compare.run_comparison(t, SETTINGS, device=torch.device("cpu"), run_id="r", work=tmp_path)
    order = [side for mode, side in calls if mode == "full"]
    assert order == ["fastft", "timm", "timm", "fastft", "fastft", "timm"]  # neither side always first
    full, partial = entry["modes"]["full"], entry["modes"]["partial"]
    assert full["ratios"] == pytest.approx([1.5, 1.1, 1.5]) and full["ratio_median"] == pytest.approx(1.5)
    assert partial["ratio_median"] == pytest.approx(1.1)

    doc = {"timm": entry}
    targets = {x["name"]: x for x in analysis.timm_targets(doc)}
    assert targets["timm_ratio: full"]["met"] is True
    assert targets["timm_ratio: partial"]["met"] is True and targets["timm_ratio: partial"]["value"] == 1.1
    md = "\n".join(report.render_timm(doc))
    assert "| full | 30.0, 33.0, 36.0 | 20.0, 30.0, 24.0 | 1.50, 1.10, 1.50 | 1.50 |" in md


def test_a_missed_timm_target_says_so() -> None:
    doc = {"timm": {"modes": {"full": {"ratios": [0.9, 1.0, 0.95], "ratio_median": 0.95}}}}
    (t,) = analysis.timm_targets(doc)
    assert t["met"] is False and t["threshold"] == ">= 1.1" and "breakdown" in t["why"]
    assert "**MISSED**" in "\n".join(report.render_targets({"targets": [t]}))
