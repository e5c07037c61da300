"""The frozen-feature cache on a text linear probe: the pooled encoder output computed once, then trained from, with
the same batches as the uncached run; reused from disk until the data changes; what it cannot cache is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_text_train import text_config, text_data, write_rows  # noqa: F401  (text_data: a fixture)

from fastft.errors import ConfigError
from fastft.train import finetune


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache


def _probe(text_data, out, **settings):
    # train mode: the probe's dropout (0.1) draws masks from the run's RNG in both runs
    return finetune(text_config(text_data, out, optim__epochs=3, model__freeze="backbone", **settings))


def _losses(result) -> list[float]:
    import json

    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


def test_a_cached_probe_trains_like_the_uncached_one(text_data, tmp_path) -> None:
    plain = _probe(text_data, tmp_path / "plain")
    cached = _probe(text_data, tmp_path / "cached", features__cache="memory", features__dtype="fp32")
    assert plain.feature_cache == {} and cached.feature_cache["train"] == "built"
    assert cached.feature_cache["rows"] == 90
    assert _losses(cached) == pytest.approx(_losses(plain), rel=1e-5, abs=1e-6)
    a, b = (load_file(r.paths["model_export"]) for r in (plain, cached))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert cached.metrics["confusion_matrix"] == plain.metrics["confusion_matrix"]


def test_the_disk_cache_is_reused_until_the_rows_change(text_data, tmp_path) -> None:
    settings = {"features__cache": "disk", "features__dir": str(tmp_path / "features"), "features__dtype": "fp32"}
    first = _probe(text_data, tmp_path / "a", **settings)
    again = _probe(text_data, tmp_path / "b", **settings)
    assert (first.feature_cache["train"], again.feature_cache["train"]) == ("built", "disk")
    assert again.feature_cache["val"] == "disk"
    a, b = (load_file(r.paths["model_export"]) for r in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = write_rows(tmp_path / "train2.csv", 60, seed=5)  # other rows, same classes
    cfg = text_config(text_data, tmp_path / "c", optim__epochs=1, model__freeze="backbone", **settings)
    cfg.data.train_list = str(changed)
    third = finetune(cfg)
    assert (third.feature_cache["train"], third.feature_cache["val"]) == ("built", "disk")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model__freeze": "until:layer.0"}, "features.cache: a text model caches the pooled output"),
        ({"features__views": 2}, "features.views: text rows have no augmented views"),
    ],
)
def test_what_the_text_cache_cannot_do_is_one_line(text_data, tmp_path, settings, message) -> None:
    cfg = text_config(text_data, tmp_path / "runs", features__cache="memory", model__freeze="backbone")
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=f"^{message}"):
        finetune(cfg.validate())
    assert not (tmp_path / "runs").exists()
