"""The names train.py, api.py and the tests import from before the model sources moved to fastft/backbones/.

Compatibility shim for this version: `build_model` returns the bare `nn.Module` with its head path pinned on it as
`model.fastft_head` and its stages as `model.fastft_stages`, which `freeze`, `split_model` and optim's parameter
groups read when they are not given a Backbone's. New code calls `fastft.backbones.build_backbone` and passes
`backbone.head` / `backbone.stages()` explicitly.
"""

from __future__ import annotations

from torch import nn

from fastft.backbones import build_backbone, trace_options
from fastft.backbones.freeze import (  # noqa: F401 — re-exported
    _BN_TYPES,
    count_parameters,
    find_head,
    freeze_bn,
    get_submodule,
    is_frozen_bn,
    set_submodule,
    unfreeze_bn,
)
from fastft.backbones.freeze import freeze as _freeze
from fastft.backbones.split import Split
from fastft.backbones.split import split_model as _split_model
from fastft.backbones.torchvision import (  # noqa: F401 — re-exported
    drop_aux_heads,
    fit_input_size,
    list_model_names,
    preset_weights,
    replace_head,
    resolve_weights,
)
from fastft.backbones.weights import load_state_file  # noqa: F401 — re-exported
from fastft.config import ModelConfig


def build_model(cfg: ModelConfig, num_classes: int, *, image_size: int = 0, pretrained_ok: bool = True) -> nn.Module:
    """`build_backbone(...).model`, with `fastft_head` and `fastft_stages` pinned on it (see the module docstring)."""
    backbone = build_backbone(cfg, num_classes, image_size=image_size, pretrained_ok=pretrained_ok)
    model = backbone.model
    model.fastft_head = backbone.head  # type: ignore[assignment]
    model.fastft_stages = backbone.stages()  # type: ignore[assignment]
    return model


def _head(model: nn.Module) -> str:
    return getattr(model, "fastft_head", None) or find_head(model)


def freeze(model: nn.Module, policy: str | list[str]) -> tuple[int, int]:
    """`fastft.backbones.split.freeze` with the head and stages pinned on the model by `build_model`."""
    return _freeze(model, policy, head=_head(model), stages=getattr(model, "fastft_stages", None))


def split_model(model: nn.Module) -> Split:
    """`fastft.backbones.split.split_model` with the pinned head and the source's tracer options."""
    return _split_model(model, head=_head(model), trace=trace_options(model))
