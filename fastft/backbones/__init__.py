"""Model sources behind one contract (fastft.backbones.base.Backbone): `build_backbone` picks the source named by
`model.source`; the source's module is imported only when used (timm stays optional)."""

from __future__ import annotations

from torch import nn

from fastft.backbones.base import Backbone, Stage, TextSpec, meta
from fastft.config import ModelConfig
from fastft.data.transforms import TransformSpec
from fastft.errors import ModelError

__all__ = ["Backbone", "Stage", "TextSpec", "build_backbone", "meta", "preprocess_spec", "trace_options"]


def _source(name: str):
    if name == "torchvision":
        from fastft.backbones import torchvision

        return torchvision
    if name == "timm":
        try:
            from fastft.backbones import timm
        except ImportError as e:
            if e.name != "timm":
                raise
            raise ModelError("model.source=timm needs timm (pip install 'fastft[timm]')") from None
        return timm
    raise ModelError(f"model.source={name!r} is not built yet in this version (torchvision, timm, hf)")


def build_backbone(
    cfg: ModelConfig,
    num_classes: int,
    *,
    image_size: int = 0,
    pretrained_ok: bool = True,
    max_length: int = 128,
    labels: list[str] | None = None,
) -> Backbone:
    """The classifier `cfg` names, from its source, with its weights and a new `num_classes` head (nothing frozen).

    `image_size` is the crop the loaders produce (0 = the model's own); `pretrained_ok=False` skips the weights
    (evaluation rebuilds a model and loads a checkpoint over it). A text encoder (source "hf") is read from its
    folder (or the hub cache) whatever `pretrained_ok` says; `max_length` and the class names `labels` are its own."""
    if cfg.source == "hf":
        from fastft.backbones.hf_text import HFTextBackbone

        return HFTextBackbone(cfg.name, num_classes, max_length=max_length, labels=labels)
    return _source(cfg.source).build(cfg, num_classes, image_size=image_size, pretrained_ok=pretrained_ok)


def preprocess_spec(cfg: ModelConfig, image_size: int = 0, *, max_length: int = 128) -> TransformSpec | TextSpec:
    """The loaders' input contract for `cfg`'s model, read from its source's preset without building the model:
    an image transform, or (source "hf") the tokenizer folder and `max_length`."""
    if cfg.source == "hf":
        from fastft.backbones.hf_text import text_spec

        return text_spec(cfg.name, max_length)
    return _source(cfg.source).preprocess_spec(cfg, image_size)


def trace_options(model: nn.Module):
    """What torch.fx must keep whole when tracing `model`: timm's registry for a timm model, else nothing extra."""
    from fastft.backbones.split import TraceOptions

    if type(model).__module__.startswith("timm."):
        from fastft.backbones.timm import trace_options as timm_options

        return timm_options(model)
    return TraceOptions()
