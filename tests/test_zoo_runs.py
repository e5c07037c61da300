"""End to end on families with stochastic depth: a partial fine-tune's own final evaluation is the evaluation of the
checkpoint it saved (before the fix, the frozen prefix dropped residual blocks at random in evaluation too)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import tiny_config
from safetensors.torch import save_file

import fastft
from fastft.train import finetune


@pytest.mark.parametrize(("name", "policy"), [("convnext_tiny", "until:features.4"), ("swin_t", "until:features.3")])
def test_final_evaluation_equals_eval_of_the_checkpoint(shapes4, tmp_path, name: str, policy: str) -> None:
    weights = "none"
    if name == "convnext_tiny":  # layer scale 1 (torchvision starts at 1e-6, which hides a dropped block)
        torch.manual_seed(0)
        model = torchvision.models.convnext_tiny()
        for block in model.modules():
            if type(block).__name__ == "CNBlock":
                block.layer_scale.data.fill_(1.0)
        weights = str(tmp_path / "convnext_ls1.safetensors")
        save_file(model.state_dict(), weights)
    cfg = tiny_config(
        shapes4,
        tmp_path,
        model__name=name,
        model__weights=weights,
        model__freeze=policy,
        optim__max_steps=2,
        optim__epochs=1,
    )
    result = finetune(cfg)
    first = fastft.evaluate(result.paths["last"], shapes4 / "val", device="cpu", precision="fp32", workers=0)
    again = fastft.evaluate(result.paths["last"], shapes4 / "val", device="cpu", precision="fp32", workers=0)
    assert first.metrics["num_samples"] == 24
    assert first.metrics["confusion_matrix"] == again.metrics["confusion_matrix"]
    assert first.metrics["loss"] == again.metrics["loss"]  # two passes, bit-identical
    assert abs(result.metrics["loss"] - first.metrics["loss"]) < 1e-5, (result.metrics["loss"], first.metrics["loss"])
    assert result.metrics["confusion_matrix"] == first.metrics["confusion_matrix"]
