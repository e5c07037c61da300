"""Gradual unfreezing and torch.compile on a text encoder (the tiny BERT of tiny_bert.py), through the real run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_text_train import text_config, text_data  # noqa: F401  (text_data: a fixture)

import fastft.trainer as trainer
from fastft.train import finetune


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache


def _losses(result) -> list[float]:
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


def test_an_unfrozen_text_layer_trains_only_from_its_epoch(text_data, tmp_path, monkeypatch) -> None:
    """A cached linear probe (dropout 0.1) unfreezing encoder layer 1 at epoch 2: after epoch 1 every encoder weight
    equals the folder's; in epoch 2 layer 1 runs in train mode with autograd at each of the 7 steps (no longer from
    the cache) and every one of its tensors moves, while the embeddings, layer 0 and the pooler never change."""
    snapshots, calls = [], []

    def spy_end(run, epoch, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
        return real_end(run, epoch, *args, **kwargs)

    real_end = trainer.end_of_epoch
    monkeypatch.setattr(trainer, "end_of_epoch", spy_end)
    real_build = trainer.build_backbone

    def build(*args, **kwargs):  # the layer's forwards: (epochs finished, train mode, autograd on)
        backbone = real_build(*args, **kwargs)
        layer = backbone.hf.bert.encoder.layer[1]
        layer.register_forward_hook(lambda m, i, o: calls.append((len(snapshots), m.training, torch.is_grad_enabled())))
        return backbone

    monkeypatch.setattr(trainer, "build_backbone", build)
    cfg = text_config(
        text_data,
        tmp_path,
        model__freeze="backbone",
        optim__epochs=2,
        features__cache="memory",
        features__dtype="fp32",
        optim__unfreeze=["2:hf.bert.encoder.layer.1:0.1"],
    )
    result = finetune(cfg)
    folder = load_file(text_data["bert"] / "model.safetensors")
    assert len(snapshots) == 2
    layer1 = {k for k in folder if k.startswith("encoder.layer.1.")}
    moved = [{k for k, v in folder.items() if not torch.equal(s[f"hf.bert.{k}"], v)} for s in snapshots]
    assert moved[0] == set()  # epoch 1: the probe trained from the cache, the encoder untouched
    assert moved[1] == layer1  # epoch 2: all of layer 1, nothing else of the encoder
    trained = [(epoch, mode) for epoch, mode, grad in calls if grad]
    assert trained == [(1, True)] * 7  # 60 rows / batch 8: each step of epoch 2, in train mode
    export = load_file(result.paths["model_export"])
    assert all(torch.equal(export[f"hf.bert.{k}"], v) for k, v in folder.items() if k not in layer1)


@pytest.mark.parametrize(
    ("freeze", "backend", "lr"),
    # the cut (hidden states of every length into the compiled layers) is the slower compile
    [("backbone", "inductor", 0.05), pytest.param("until:layer.0", "aot_eager", 0.003, marks=pytest.mark.slow)],
)
def test_compiled_text_run_matches_eager(text_data, tmp_path, freeze, backend, lr) -> None:
    """compile.target=head (the trainable part compiled) trains a linear probe (inductor) and a cut between encoder
    layers (aot_eager: the same graph capture, without inductor's code generation) in train mode with dropout 0.1 to
    the eager run's step losses and val loss (1e-6). Batches of every length go through one graph per grad mode
    (training, evaluation), not one per length."""
    import torch._dynamo
    import torch._inductor.config

    common = dict(model__freeze=freeze, optim__epochs=1, optim__lr=lr)
    eager = finetune(text_config(text_data, tmp_path, run__name="eager", **common))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fallback_random=True):  # inductor's dropout draws eager's masks
        compiled = finetune(
            text_config(
                text_data, tmp_path, run__name="compiled", compile__target="head", compile__backend=backend, **common
            )
        )
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert len(_losses(compiled)) == 7
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-6, abs=1e-6)
    assert compiled.metrics["loss"] == pytest.approx(eager.metrics["loss"], rel=1e-6, abs=1e-6)
    assert compiled.metrics["confusion_matrix"] == eager.metrics["confusion_matrix"]
    assert graphs <= 2
