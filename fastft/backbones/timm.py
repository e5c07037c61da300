"""timm models as a Backbone: `timm.create_model`, weights from the local cache or a file, timm's own classifier
contract (`reset_classifier`, `pretrained_cfg["classifier"]`), data config, stages from `group_matcher`, and timm's fx
registry for the prefix/suffix split."""

from __future__ import annotations

import difflib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastft import act_ckpt
from fastft.backbones import freeze, split
from fastft.backbones.base import Stage, meta
from fastft.backbones.weights import is_path, load_state_file, save_state, try_load
from fastft.config import ModelConfig
from fastft.data.transforms import TransformSpec
from fastft.errors import CheckpointError, ModelError

log = logging.getLogger("fastft")

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class TimmBackbone:
    """A timm classifier with a new head (see fastft.backbones.base.Backbone)."""

    source = "timm"
    modality = "image"

    def __init__(self, name: str, model: nn.Module, head: str, spec: TransformSpec) -> None:
        self.name, self.model, self.head, self._spec = name, model, head, spec

    def stages(self) -> list[Stage]:
        """timm's coarse `group_matcher` groups (stem, each stage or block, neck), the new head left out."""
        if not hasattr(self.model, "group_matcher"):
            groups = freeze.module_stages(self.model, self.head)
        else:
            from timm.models._manipulate import group_parameters

            grouped = group_parameters(self.model, self.model.group_matcher(coarse=True))
            groups = [[n for n in names if not freeze.in_head(n, self.head)] for _, names in sorted(grouped.items())]
            groups = [g for g in groups if g]
        return freeze.name_stages(self.model, groups, self.head)

    def preprocess(self) -> TransformSpec:
        return self._spec

    def inputs(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def export(self, folder: Path) -> list[Path]:
        """model.safetensors: the state dict `timm.create_model(name, num_classes=K)` loads (with the fastft head
        shape: a hidden layer makes the head a Sequential)."""
        return [save_state(self.model, Path(folder) / "model.safetensors", {"fastft": json.dumps(meta(self))})]


def trace_options(model: nn.Module) -> split.TraceOptions:
    """timm's own fx registry: the modules it keeps whole and the functions it calls opaquely when tracing. A model
    with gradient checkpointing on is not traced: tracing inlines `checkpoint_seq`, and the suffix would silently
    keep every activation."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    why = (
        "model.activation_checkpointing: a traced graph would not recompute"
        if getattr(model, "grad_checkpointing", False)
        else ""
    )
    modules, functions = tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))
    return split.TraceOptions(modules, functions, why)


def pretrained_cfg(name: str) -> dict:
    """The model's pretrained config (input size, mean/std, interpolation, crop_pct, classifier, weights location).

    Raises:
        ModelError: an unknown model name (with close matches) or pretrained tag."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        names = timm.list_models()
        close = ", ".join(difflib.get_close_matches(name, names, n=3, cutoff=0.5))
        raise ModelError(f"unknown timm model {name!r}{f' (did you mean {close}?)' if close else ''}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:
        raise ModelError(f"model.name: {name!r}: {str(e).splitlines()[0]}") from None
    return cfg.to_dict() if cfg is not None else {}


def spec_from_cfg(cfg: dict, image_size: int = 0) -> TransformSpec:
    """timm's data config as a TransformSpec: crop = input size (or `image_size`), resize = floor(crop / crop_pct)
    (timm's eval transform), its mean/std and interpolation."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg or {"input_size": (3, 224, 224)})
    crop = image_size or int(data["input_size"][-1])
    interp = data["interpolation"]
    if interp not in _INTERPOLATIONS:
        interp = "bilinear"  # timm's "random" (training only): the evaluation transform resizes bilinearly
    if data.get("crop_mode", "center") != "center":
        log.info("fastft: %s crop_mode=%s: fastft centre-crops", cfg.get("architecture"), data["crop_mode"])
    resize = max(crop, math.floor(crop / data["crop_pct"]))
    return TransformSpec(crop, resize, tuple(data["mean"]), tuple(data["std"]), interp)


def preprocess_spec(cfg: ModelConfig, image_size: int = 0) -> TransformSpec:
    """What the loaders produce for this model (timm's data config), without building it."""
    return spec_from_cfg(pretrained_cfg(cfg.name), image_size)


def cached_weights(name: str, pcfg: dict) -> Path:
    """The local file of the model's default pretrained weights (Hugging Face hub cache, or torch hub for a url).

    Raises:
        ModelError: the weights are not cached (nothing is downloaded)."""
    hub_id = pcfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        files = [pcfg["hf_hub_filename"]] if pcfg.get("hf_hub_filename") else []
        files += [
            "model.safetensors",
            "open_clip_model.safetensors",
            "pytorch_model.bin",
            "open_clip_pytorch_model.bin",
        ]
        for f in files:
            found = try_to_load_from_cache(hub_id, f)
            if isinstance(found, str):
                return Path(found)
    if pcfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(pcfg["url"]).name
        if path.is_file():
            return path
    where = hub_id or pcfg.get("url") or "no published location"
    raise ModelError(
        f"model.weights=DEFAULT: the timm weights of {name} ({where}) are not in the local cache; fetch them once "
        f"(timm.create_model({name!r}, pretrained=True)), or give a weights file, or model.weights=none"
    )


def build(cfg: ModelConfig, num_classes: int, *, image_size: int = 0, pretrained_ok: bool = True) -> TimmBackbone:
    """`timm.create_model(cfg.name, num_classes=K)` with its weights (DEFAULT from the local cache, a file, or none)
    and a new head; ViT-like models (fixed input size) are built for `image_size`, their position embeddings
    resampled by timm's own checkpoint filter.

    Raises:
        ModelError: unknown name, weights not cached, an input size the architecture cannot take.
        CheckpointError: a weights file that does not fit the model.
    """
    pcfg = pretrained_cfg(cfg.name)
    state = _weights_state(cfg, pcfg) if pretrained_ok else None
    size = {"img_size": image_size} if image_size and pcfg.get("fixed_input_size") else {}
    if cfg.drop_path >= 0:
        size["drop_path_rate"] = cfg.drop_path  # timm ramps it linearly over the blocks
    if state is None or _is_export(state, pcfg, num_classes):
        model = _create(cfg.name, num_classes, size)
        head = _new_head(model, num_classes, cfg)
        if state is not None and not try_load(model, state):  # a fastft export: loads with its head, as saved
            from fastft.checkpoint import describe_mismatch

            raise CheckpointError(f"{cfg.weights}: does not match {cfg.name} ({describe_mismatch(model, state)})")
    else:
        # timm adapts the file with the model's checkpoint filter (position embeddings to the input size) and loads it
        # strictly with the classifier it was saved with (asking for `num_classes` would skip unmatched keys).
        try:
            overlay = {"state_dict": state}
            model = _create(cfg.name, pcfg.get("num_classes", 1000), size, pretrained_cfg_overlay=overlay)
        except Exception as e:
            raise CheckpointError(f"{cfg.weights}: does not match {cfg.name} ({_first_line(e)})") from None
        head = _new_head(model, num_classes, cfg)
    if act_ckpt.enabled(cfg):
        model.set_grad_checkpointing(True)
    return TimmBackbone(cfg.name, model, head, spec_from_cfg(pcfg, image_size))


def _is_export(state: dict[str, torch.Tensor], pcfg: dict, num_classes: int) -> bool:
    """A fastft export of this task (its head: a hidden layer or dropout, or `num_classes` outputs where the
    pretrained classifier has another count) rather than a trunk with the classifier it was trained with."""
    path = pcfg.get("classifier")
    if not isinstance(path, str):
        return False
    if any(k.startswith(f"{path}.") and k.split(".")[-2].isdigit() for k in state):  # a Sequential head
        return True
    weight = state.get(f"{path}.weight")
    return weight is not None and weight.shape[0] == num_classes != pcfg.get("num_classes", 1000)


def _weights_state(cfg: ModelConfig, pcfg: dict) -> dict[str, torch.Tensor] | None:
    if cfg.weights.lower() in ("none", ""):
        return None
    if is_path(cfg.weights):
        return load_state_file(cfg.weights)
    if cfg.weights != "DEFAULT":
        raise ModelError(
            f"model.weights: {cfg.weights!r} for a timm model: use DEFAULT, none or a weights file (name a pretrained "
            f"tag in model.name, e.g. resnet50.a1_in1k)"
        )
    return load_state_file(cached_weights(cfg.name, pcfg))


def _create(name: str, num_classes: int, size: dict, **kw) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained="pretrained_cfg_overlay" in kw, num_classes=num_classes, **size, **kw)
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        if size["drop_path_rate"] > 0:
            raise ModelError(f"model.drop_path: {name} takes no drop_path_rate (no stochastic depth)") from None
        return _create(name, num_classes, {k: v for k, v in size.items() if k != "drop_path_rate"}, **kw)
    except (AssertionError, ValueError) as e:
        if "img_size" in size:
            raise ModelError(f"data.image_size: {size['img_size']} does not fit {name} ({_first_line(e)})") from None
        raise


def _new_head(model: nn.Module, num_classes: int, cfg: ModelConfig) -> str:
    """A fresh classifier through timm's own contract (`reset_classifier`); its path is `pretrained_cfg
    ["classifier"]`. A hidden layer or dropout puts fastft's head in its place."""
    path = model.pretrained_cfg.get("classifier")
    if not isinstance(path, str) or freeze.get_submodule(model, path) is not model.get_classifier():
        raise ModelError(f"{cfg.name}: the classifier {path!r} is not one module (distilled heads are not supported)")
    model.reset_classifier(num_classes)
    if cfg.head_hidden or cfg.head_dropout:
        old = model.get_classifier()
        freeze.set_submodule(
            model, path, freeze.new_head(old, num_classes, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
        )
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
