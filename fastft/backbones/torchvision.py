"""The torchvision zoo as a Backbone: weights resolution, input-size fitting, auxiliary heads, the per-family head."""

from __future__ import annotations

import contextlib
import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastft import act_ckpt
from fastft.backbones import freeze
from fastft.backbones.base import Stage, meta
from fastft.backbones.weights import init_skipped, is_path, load_state_file, save_state, try_load
from fastft.config import ModelConfig
from fastft.data.transforms import TransformSpec, spec_from_weights
from fastft.errors import ModelError


class TorchvisionBackbone:
    """A torchvision classifier with a new head (see fastft.backbones.base.Backbone)."""

    source = "torchvision"
    modality = "image"

    def __init__(self, name: str, model: nn.Module, head: str, spec: TransformSpec) -> None:
        self.name, self.model, self.head, self._spec = name, model, head, spec

    def stages(self) -> list[Stage]:
        return freeze.name_stages(self.model, freeze.module_stages(self.model, self.head), self.head)

    def preprocess(self) -> TransformSpec:
        return self._spec

    def inputs(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def export(self, folder: Path) -> list[Path]:
        """model.safetensors: the state dict `torchvision.models.get_model(name, num_classes=K)` loads (with the
        fastft head shape: a hidden layer makes the head a Sequential)."""
        return [save_state(self.model, Path(folder) / "model.safetensors", {"fastft": json.dumps(meta(self))})]


def list_model_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def resolve_weights(name: str, weights: str) -> Any:
    """Map DEFAULT / an enum name / none to a torchvision weights enum (or None). Paths return None."""
    import torchvision

    if weights.lower() in ("none", "") or is_path(weights):
        return None
    enum = torchvision.models.get_model_weights(name)
    key = weights.split(".")[-1]  # accept "ResNet50_Weights.IMAGENET1K_V2" as well as "IMAGENET1K_V2"
    if key == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[key]
    except KeyError:
        raise ModelError(
            f"model.weights: {weights!r} is not a weights name for {name} (choose from DEFAULT, "
            f"{', '.join(w.name for w in enum)}, none, or a .pt/.pth/.safetensors file)"
        ) from None


def preset_weights(name: str, weights: str) -> Any:
    """The weights whose transform preset (resize, crop, mean/std) the data path follows; the DEFAULT ones when none.

    Reading a preset never downloads anything."""
    import torchvision

    w = resolve_weights(name, weights)
    if w is None:
        try:
            w = torchvision.models.get_model_weights(name).DEFAULT
        except Exception:  # models without published weights
            return None
    return w


def preprocess_spec(cfg: ModelConfig, image_size: int = 0) -> TransformSpec:
    """The weights' preset (ImageNet defaults without one), rescaled to `image_size` when set. Builds no model."""
    return spec_from_weights(preset_weights(cfg.name, cfg.weights), image_size)


def build(
    cfg: ModelConfig, num_classes: int, *, image_size: int = 0, pretrained_ok: bool = True
) -> TorchvisionBackbone:
    """Build `cfg.name` with its weights and a new `num_classes` head (nothing frozen yet).

    `image_size` (the crop the loaders produce; 0 = the model's own) sizes models whose input size is fixed by their
    architecture: ViT position embeddings are interpolated to it, MaxViT is rebuilt for it.

    Raises:
        ModelError: unknown model name (with close matches), weights that cannot be had, or an input size the
            architecture cannot take.
    """

    names = list_model_names()
    if cfg.name not in names:
        close = difflib.get_close_matches(cfg.name, names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {cfg.name!r}{hint}")
    weights = resolve_weights(cfg.name, cfg.weights) if pretrained_ok else None
    # Weights to come (torchvision's, loaded strictly by get_model; or a file, loaded strictly below or refused):
    # the random initialisation they overwrite is skipped.
    loaded = weights is not None or is_path(cfg.weights)
    with init_skipped() if loaded else contextlib.nullcontext():
        model = _get_model(cfg.name, weights, cfg.drop_path)
    drop_aux_heads(model)
    if image_size:
        model = fit_input_size(cfg.name, model, image_size, drop_path=cfg.drop_path)
    if act_ckpt.enabled(cfg):
        act_ckpt.check_supported(cfg.name, model)
    spec = preprocess_spec(cfg, image_size)

    def with_head() -> TorchvisionBackbone:
        head = replace_head(model, num_classes, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
        return TorchvisionBackbone(cfg.name, model, head, spec)

    if not is_path(cfg.weights):
        return with_head()
    state = {k: v for k, v in load_state_file(cfg.weights).items() if not k.startswith(_AUX_PREFIXES)}
    state = _vit_state_to_size(model, state)
    # A backbone file (original classifier) loads before the head is replaced; a fastft export after.
    if try_load(model, state):
        return with_head()
    backbone = with_head()
    if not try_load(model, state):
        from fastft.checkpoint import describe_mismatch
        from fastft.errors import CheckpointError

        raise CheckpointError(f"{cfg.weights}: does not match {cfg.name} ({describe_mismatch(model, state)})")
    return backbone


def _get_model(name: str, weights: Any, drop_path: float, **kw) -> nn.Module:
    """`torchvision.models.get_model` with `stochastic_depth_prob=drop_path` (-1: the builder's own rate).

    Raises:
        ModelError: drop_path > 0 for a family without stochastic depth; weights that cannot be had.
    """
    import torchvision

    try:
        if drop_path < 0:
            return torchvision.models.get_model(name, weights=weights, **kw)
        try:
            return torchvision.models.get_model(name, weights=weights, stochastic_depth_prob=drop_path, **kw)
        except TypeError as e:
            if "stochastic_depth_prob" not in str(e):
                raise
            fixed = "multiple values" in str(e)  # swin's builders fix the rate (0.2 to 0.5 by size)
        if not fixed and drop_path > 0:
            raise ModelError(f"model.drop_path: {name} has no stochastic depth (families: {_DROP_PATH})")
        model = torchvision.models.get_model(name, weights=weights, **kw)  # drop_path 0 without it: off already
        if fixed:
            _rescale_stochastic_depth(model, drop_path)
        return model
    except ModelError:
        raise
    except Exception as e:
        if kw and isinstance(e, ValueError):  # an input size MaxViT cannot take: fit_input_size says so
            raise
        raise ModelError(f"cannot get {name} weights {weights}: {str(e).splitlines()[0]}") from None


_DROP_PATH = "convnext, efficientnet, maxvit, swin"


def _rescale_stochastic_depth(model: nn.Module, rate: float) -> None:
    """Scale the per-block rates so the deepest is `rate`: the ramp swin's builder makes for stochastic_depth_prob."""
    from torchvision.ops import StochasticDepth

    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    top = max(m.p for m in layers)
    for m in layers:
        m.p = m.p * rate / top


def replace_head(model: nn.Module, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> str:
    """Replace the classifier (the family's last Linear, or squeezenet's conv) with a fresh head; return its path."""
    path = freeze.find_head(model)
    freeze.set_submodule(
        model, path, freeze.new_head(freeze.get_submodule(model, path), num_classes, hidden=hidden, dropout=dropout)
    )
    return path


def fit_input_size(name: str, model: nn.Module, image_size: int, *, drop_path: float = -1) -> nn.Module:
    """The model made to take `image_size` inputs where its architecture fixes the input size, weights kept: a ViT's
    position embeddings are interpolated to the new patch grid (torchvision's `interpolate_embeddings`), a MaxViT is
    rebuilt for the size (its weights do not depend on it). Call before the head is replaced."""
    from torchvision.models.maxvit import MaxVit
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer) and image_size != model.image_size:
        if image_size % model.patch_size:
            raise ModelError(
                f"data.image_size: {image_size} does not fit {name}: use a multiple of its patch size "
                f"{model.patch_size} (its pretrained size is {model.image_size})"
            )
        model.image_size = image_size
        model.seq_length = (image_size // model.patch_size) ** 2 + 1
        embedding = _vit_state_to_size(model, {"encoder.pos_embedding": model.encoder.pos_embedding.data})
        model.encoder.pos_embedding = nn.Parameter(embedding["encoder.pos_embedding"])
    elif isinstance(model, MaxVit) and image_size != _maxvit_size(model):
        try:
            resized = _get_model(name, None, drop_path, input_size=(image_size, image_size))
        except ValueError:
            raise ModelError(
                f"data.image_size: {image_size} does not fit {name}: every stage's feature map must divide into "
                f"{model.partition_size}x{model.partition_size} windows (use a multiple of "
                f"{32 * model.partition_size})"
            ) from None
        resized.load_state_dict(model.state_dict())  # relative position tables depend on the window, not the input
        model = resized
    return model


def _vit_state_to_size(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with its ViT position embeddings interpolated to `model`'s patch grid (unchanged where they fit)."""
    from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

    key = "encoder.pos_embedding"
    if not isinstance(model, VisionTransformer) or key not in state or state[key].shape[1] == model.seq_length:
        return state
    return interpolate_embeddings(model.image_size, model.patch_size, state)


def _maxvit_size(model: nn.Module) -> int:
    return model.blocks[0].grid_size[0] * 4  # the stem and the first block each halve the input


# Auxiliary classifiers (inception_v3's AuxLogits, googlenet's aux1/aux2) make the model return a named tuple in
# train mode. fastft drops them at build time: the fine-tuned model is the main classifier, as torchvision's
# `aux_logits=False` model is, and its state dict loads into that model.
_AUX_PREFIXES = ("AuxLogits.", "aux1.", "aux2.")


def drop_aux_heads(model: nn.Module) -> None:
    """Remove inception_v3 / googlenet auxiliary classifiers, so train mode returns plain logits."""
    if hasattr(model, "aux_logits") and model.aux_logits:
        model.aux_logits = False
        for name in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, name):
                setattr(model, name, None)
