"""Many heads per backbone pass: a sweep of 4 LRs equals 4 separate runs, and the best head is kept."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from fastft.errors import ConfigError
from fastft.train import finetune

LRS = [0.003, 0.01, 0.03, 0.1]


def test_sweep_of_four_lrs_equals_four_separate_runs(shapes4, tmp_path) -> None:
    common = {
        "optim__epochs": 2,
        "data__augment": True,
        "model__freeze": "backbone",
        "optim__weight_decay": 1e-3,
        "optim__clip_grad_norm": 0.5,
    }
    sweep = finetune(
        tiny_config(
            shapes4,
            tmp_path,
            run__name="sweep",
            head__sweep_lr=LRS,
            features__cache="memory",
            features__dtype="fp32",
            features__views=2,
            **common,
        )
    )
    rows = sweep.metrics["sweep"]
    assert [r["lr"] for r in rows] == LRS
    ckpt = torch.load(sweep.paths["last"], weights_only=True)
    for i, lr in enumerate(LRS):
        alone = finetune(
            tiny_config(
                shapes4,
                tmp_path,
                run__name=f"lr{i}",
                optim__lr=lr,
                features__cache="memory",
                features__dtype="fp32",
                features__views=2,
                **common,
            )
        )
        head = load_file(alone.paths["head_export"])
        for k, v in head.items():
            # one einsum over stacked heads vs one matmul: fp32 rounding only
            torch.testing.assert_close(ckpt["sweep_bank"][f"heads.{i}.{k}"], v, atol=1e-5, rtol=1e-4)
        assert rows[i]["top1"] == pytest.approx(alone.metrics["top1"], abs=1e-6)
        assert rows[i]["loss"] == pytest.approx(alone.metrics["loss"], abs=1e-4)
    # The kept head is the best by the chosen metric, and it is the run's exported head.
    best = max(range(4), key=lambda i: rows[i]["f1_macro"])
    assert sweep.metrics["sweep_best"] == best
    kept = load_file(sweep.paths["head_export"])
    assert torch.equal(kept["weight"], ckpt["sweep_bank"][f"heads.{best}.weight"])
    assert json.loads((sweep.run_dir / "metrics.json").read_text())["sweep_best"] == best


def test_sweep_grid_with_weight_decay_and_refusals(shapes4, tmp_path) -> None:
    r = finetune(
        tiny_config(
            shapes4,
            tmp_path,
            run__name="grid",
            head__sweep_lr=[0.01, 0.1],
            head__sweep_weight_decay=[0.0, 0.1],
            optim__epochs=1,
        )
    )
    assert [(x["lr"], x["weight_decay"]) for x in r.metrics["sweep"]] == [
        (0.01, 0.0),
        (0.01, 0.1),
        (0.1, 0.0),
        (0.1, 0.1),
    ]
    with pytest.raises(ConfigError, match="linear probe"):
        finetune(tiny_config(shapes4, tmp_path, run__name="bad", head__sweep_lr=[0.1], model__freeze="until:layer3"))


def test_a_bank_of_dropout_heads_draws_a_lone_heads_mask() -> None:
    """Heads that are dropout then linear (an image head with model.head_dropout, a text classifier), in train mode:
    each head's logits equal that head alone on the same features with the same seed (one mask for the bank, the one
    the lone head draws), through the bank's single einsum."""
    from torch import nn

    from fastft.sweep import HeadBank

    torch.manual_seed(0)
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))
    bank = HeadBank(head, 3).train()
    with torch.no_grad():
        for i, h in enumerate(bank.heads):  # three different heads
            h[1].weight.mul_(i + 1)
    x = torch.randn(5, 6)
    torch.manual_seed(7)
    out = bank(x)
    assert out.shape == (3, 5, 3)
    for i, h in enumerate(bank.heads):
        torch.manual_seed(7)
        torch.testing.assert_close(out[i], h.train()(x))
