"""model.drop_path: the rate reaches the blocks' stochastic depth (torchvision's StochasticDepth p, timm's DropPath
drop_prob) with each family's own ramp, is refused on a family without stochastic depth, and stays off in the frozen
prefix while the trainable suffix drops paths in train mode."""

from __future__ import annotations

import pytest
import torch

from fastft.backbones import build_backbone
from fastft.backbones.freeze import freeze
from fastft.backbones.split import split_model
from fastft.config import FinetuneConfig, ModelConfig
from fastft.errors import ConfigError, ModelError


def _build(name: str, source: str = "torchvision", **kw):
    torch.manual_seed(0)
    return build_backbone(ModelConfig(source=source, name=name, **{"weights": "none", **kw}), 3, image_size=32)


def _rates(model: torch.nn.Module) -> list[float]:
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    return [
        m.p if isinstance(m, StochasticDepth) else m.drop_prob
        for m in model.modules()
        if isinstance(m, (StochasticDepth, DropPath))
    ]


# Each family's ramp over its n blocks, written out from its paper/torchvision code: efficientnet i/n, swin i/(n-1)
# (swin's builders fix the rate, so fastft rescales; the others take torchvision's stochastic_depth_prob).
@pytest.mark.parametrize(("name", "denominator"), [("efficientnet_b0", 0), ("swin_t", -1)])
def test_drop_path_reaches_torchvision_blocks(name: str, denominator: int) -> None:
    rates = _rates(_build(name, drop_path=0.3).model)
    n = len(rates)
    assert n > 10
    torch.testing.assert_close(torch.tensor(rates), torch.tensor([0.3 * i / (n + denominator) for i in range(n)]))


def test_drop_path_reaches_timm_blocks_and_minus_one_keeps_the_default() -> None:
    rates = _rates(_build("test_vit", "timm", drop_path=0.3).model)
    assert len(rates) > 1 and max(rates) == pytest.approx(0.3) and rates == sorted(rates)  # timm's linear ramp
    assert max(_rates(_build("efficientnet_b0").model)) == pytest.approx(0.2 * 15 / 16)  # torchvision's own 0.2


@pytest.mark.parametrize(
    ("source", "name"), [("torchvision", "vit_b_16"), ("torchvision", "resnet18"), ("timm", "vgg11")]
)
def test_drop_path_refused_where_the_family_has_none(source: str, name: str) -> None:
    with pytest.raises(ModelError, match=rf"^model.drop_path: {name} .*stochastic depth"):
        _build(name, source, drop_path=0.1)


def test_drop_path_values_refused_by_the_config() -> None:
    for model, match in (
        ({"drop_path": 1.0}, r"model.drop_path: must be in \[0.0, 1.0\)"),
        ({"source": "hf", "name": "x", "drop_path": 0.1}, "model.drop_path: not available for model.source=hf"),
        ({"source": "timm", "drop_path": 0.1, "activation_checkpointing": True}, "needs model.freeze = none"),
    ):
        cfg = FinetuneConfig()
        cfg.model = ModelConfig(**model)
        with pytest.raises(ConfigError, match=match):
            cfg.validate()


def test_frozen_prefix_keeps_every_path_while_the_suffix_drops_them() -> None:
    """efficientnet_b0, drop_path 0.5, frozen until features.4 (whose blocks have rates up to 0.5 * 8/16), modes set
    as the trainer's epoch sets them (prefix eval, suffix train): the prefix gives the same output twice, the suffix
    drops paths, and the prefix's layers in train mode would drop paths too."""
    b = _build("efficientnet_b0", drop_path=0.5)
    freeze(b.model, "until:features.4", head=b.head, stages=b.stages())
    split = split_model(b.model, head=b.head)
    assert split.kind == "graph" and max(_rates(b.model.features[:5])) > 0.2
    b.model.train()
    split.prefix.eval()  # fastft.trainer.train_one_epoch
    split.suffix.train()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        first = split.prefix(x)
        prefix = _rel(first, split.prefix(x))
        suffix = _rel(split.suffix(first), split.suffix(first))
        b.model.features[:5].train()
        layers = _rel(b.model.features[:5](x), b.model.features[:5](x))
    assert prefix == 0 and suffix > 1e-2 and layers > 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_a_weights_file_loads_under_a_new_drop_path(tmp_path) -> None:
    """Stochastic depth has no parameters: a file saved from the default build loads into a drop_path 0.4 build."""
    from safetensors.torch import save_file

    plain = _build("efficientnet_b0").model
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = build_backbone(
        ModelConfig(name="efficientnet_b0", weights=str(tmp_path / "w.safetensors"), drop_path=0.4), 3, image_size=32
    )
    assert max(_rates(loaded.model)) == pytest.approx(0.4 * 15 / 16)
    for k, v in plain.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
