"""HFTextBackbone on a tiny BERT built in conftest: stages, head, export round trip, errors, and the frozen/trainable
split (equal logits in eval mode; dropout only in the trainable part in train mode)."""

from __future__ import annotations

import pytest
import torch
from tiny_bert import tiny_bert  # noqa: F401  (fixtures used by name)

from fastft.errors import ModelError

TEXTS = ["the cat is good", "a very bad movie and the plot was awful", "dogs", "i was happy but it is slow"]


@pytest.fixture(scope="module")
def backbone(tiny_bert):
    from fastft.backbones.hf_text import HFTextBackbone

    torch.manual_seed(0)
    return HFTextBackbone(str(tiny_bert), 3, max_length=16, labels=["neg", "neu", "pos"])


def _batch(backbone, texts=TEXTS):
    enc = backbone.tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    return backbone.inputs({**enc, "index": torch.arange(len(texts))})


def _freeze(backbone, upto: str | None):
    """Freeze every stage up to and including `upto` (None: every stage, a linear probe); return the trainable set."""
    names = [s.name for s in backbone.stages()]
    frozen = {p for s in backbone.stages()[: names.index(upto) + 1 if upto else len(names)] for p in s.params}
    for n, p in backbone.model.named_parameters():
        p.requires_grad_(n not in frozen)
    return {n for n, p in backbone.model.named_parameters() if p.requires_grad}


def test_stages_head_and_inputs(backbone) -> None:
    from fastft.backbones.base import Backbone, TextSpec, meta

    assert isinstance(backbone, Backbone)
    stages = backbone.stages()
    assert [s.name for s in stages] == ["embeddings", "layer.0", "layer.1", "pooler"]
    params = [p for s in stages for p in s.params]
    assert len(params) == len(set(params))  # each parameter in exactly one stage
    names = [n for n, _ in backbone.model.named_parameters()]
    assert backbone.head == "hf.classifier"
    assert sorted(set(names) - set(params)) == ["hf.classifier.bias", "hf.classifier.weight"]
    assert all(p.startswith("hf.bert.encoder.layer.1.") for p in stages[2].params)
    assert backbone.preprocess() == TextSpec(str(backbone.folder), 16)
    assert meta(backbone)["preprocess"] == {"tokenizer": backbone.folder, "max_length": 16}
    batch = _batch(backbone)
    assert sorted(batch) == ["attention_mask", "input_ids"]  # the row index is the loader's, not the model's
    assert backbone.model.eval()(batch).shape == (4, 3)
    assert backbone.hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(backbone, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with torch.no_grad():
        backbone.hf.classifier.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))  # a "trained" head, not the fresh one
    files = backbone.export(tmp_path / "export")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    assert all(f.is_file() for f in files)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    enc = tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    batch = _batch(backbone)
    assert torch.equal(enc["input_ids"], batch["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, backbone.model.eval()(batch), rtol=0, atol=1e-6)
    assert model.classifier.bias.tolist() == [0.5, -1.0, 2.0]


def test_a_new_head_is_drawn_even_when_the_folder_has_one(backbone, tmp_path) -> None:
    from fastft.backbones.hf_text import HFTextBackbone

    with torch.no_grad():
        backbone.hf.classifier.bias.fill_(3.0)
    backbone.export(tmp_path / "e")
    assert (
        HFTextBackbone(str(tmp_path / "e"), 3, max_length=16).hf.classifier.bias.abs().max() == 0
    )  # fresh head: zero bias
    assert (
        HFTextBackbone(str(tmp_path / "e"), 3, max_length=16, new_head=False).hf.classifier.bias.tolist() == [3.0] * 3
    )


def test_load_failures_are_one_line_model_errors(tiny_bert, tmp_path, monkeypatch) -> None:
    from fastft.backbones.hf_text import HFTextBackbone

    with pytest.raises(ModelError, match=f"folder not found: {tmp_path / 'nope'}$"):
        HFTextBackbone(str(tmp_path / "nope"), 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as e:
        HFTextBackbone(str(tmp_path / "empty"), 2)
    assert f"folder {tmp_path / 'empty'}" in str(e.value) and "\n" not in str(e.value)
    # A hub name offline, absent from the (empty) cache: refused without a download attempt.
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as e:
        HFTextBackbone("fastft-test/no-such-model", 2)
    assert "'fastft-test/no-such-model' (HF_HUB_OFFLINE=1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match=r"data.max_length: 65 is more than .* takes \(64 positions\)"):
        HFTextBackbone(str(tiny_bert), 2, max_length=65)


@pytest.mark.parametrize("upto", [None, "layer.0", "layer.1"])
def test_split_equals_the_full_model_in_eval_mode(backbone, upto) -> None:
    from fastft.backbones.hf_text import split_text

    split = split_text(backbone, _freeze(backbone, upto))
    assert split.kind == ("head" if upto is None else "graph")
    batch = _batch(backbone)
    backbone.model.eval()
    split.suffix.eval()
    with torch.no_grad():
        full = backbone.model(batch)
    feats = split.prefix(batch)
    if upto is None:
        assert feats.shape == (4, 32) and not feats.requires_grad  # the pooled output: what the feature cache holds
    else:
        assert feats["hidden_states"].shape == (4, batch["input_ids"].shape[1], 32)
        assert torch.equal(feats["attention_mask"], batch["attention_mask"])
    torch.testing.assert_close(split.suffix(feats), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.forward(batch), full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("upto", [None, "layer.0"])
def test_in_train_mode_only_the_suffix_drops_out(backbone, upto) -> None:
    from fastft.backbones.hf_text import split_text

    split = split_text(backbone, _freeze(backbone, upto))
    batch = _batch(backbone)
    backbone.model.eval()
    reference = split.prefix(batch)
    backbone.model.train()  # what the training loop does; the prefix shares these modules
    a, b = split.prefix(batch), split.prefix(batch)
    key = (lambda f: f) if upto is None else (lambda f: f["hidden_states"])
    assert torch.equal(key(a), key(reference)) and torch.equal(key(b), key(reference))  # no dropout before the cut
    assert all(m.training for m in backbone.model.modules())  # and the modes are left as they were
    out1, out2 = split.suffix(a), split.suffix(a)
    assert out1.requires_grad
    assert not torch.allclose(out1, out2)  # dropout after the cut is active
    backbone.model.eval()
    torch.testing.assert_close(split.suffix(a), split.suffix(a), rtol=0, atol=0)


def test_everything_trainable_is_not_split(backbone) -> None:
    from fastft.backbones.hf_text import split_text

    for p in backbone.model.parameters():
        p.requires_grad_(True)
    split = split_text(backbone, {n for n, _ in backbone.model.named_parameters()})
    assert split.kind == "none" and split.prefix is None and split.suffix is backbone.model
    with pytest.raises(ModelError, match="nothing to train"):
        split_text(backbone, set())


def test_a_hub_name_is_read_from_the_hub_cache_offline(tiny_bert, tmp_path, monkeypatch) -> None:
    import shutil

    import huggingface_hub.constants as hub

    from fastft.backbones.hf_text import HFTextBackbone

    repo = tmp_path / "hub" / "models--fastft-test--tiny-bert"
    shutil.copytree(tiny_bert, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    backbone = HFTextBackbone("fastft-test/tiny-bert", 2, max_length=16)
    assert backbone.name == "fastft-test/tiny-bert"
    assert backbone.preprocess().tokenizer == str((repo / "snapshots" / "0123abc").resolve())
    assert backbone.hf.classifier.out_features == 2 and len(backbone.stages()) == 4


def test_layer_decay_counts_the_encoder_layers(backbone) -> None:
    """optim.layer_decay over a text encoder: the head at lr, then pooler, layer.1, layer.0, embeddings each one
    factor further (the stages' order from the head)."""
    from fastft.config import OptimConfig
    from fastft.optim import param_groups

    names = [n for n, _ in backbone.model.named_parameters()]
    groups = param_groups(
        backbone.model, names, OptimConfig(layer_decay=0.5), head=backbone.head, stages=backbone.stages()
    )
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(backbone.model.named_parameters())
    want = {
        "hf.classifier.weight": 1.0,
        "hf.bert.pooler.dense.weight": 0.5,
        "hf.bert.encoder.layer.1.attention.self.query.weight": 0.25,
        "hf.bert.encoder.layer.0.output.dense.bias": 0.125,
        "hf.bert.embeddings.word_embeddings.weight": 0.0625,
    }
    assert {k: scale[id(named[k])] for k in want} == want
    assert sorted({g["lr_scale"] for g in groups}) == [0.0625, 0.125, 0.25, 0.5, 1.0]
