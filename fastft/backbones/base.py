"""The Backbone contract: what fastft needs from a model source (torchvision, timm, Hugging Face text encoders).

A source builds the full classifier (pretrained trunk + a new head) once; everything after that (freezing, the
frozen/trainable split, the feature cache, the backends, evaluation, checkpoints) works on `Backbone.model` and asks
the backbone only the questions below. `model` is a plain `nn.Module` whose state dict is what checkpoints hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from fastft.data.transforms import TransformSpec


@dataclass(frozen=True)
class TextSpec:
    """The input contract of a text encoder: its tokenizer (a folder `AutoTokenizer` reads) and sequence length."""

    tokenizer: str
    max_length: int = 128

    def to_dict(self) -> dict:
        return {"tokenizer": self.tokenizer, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict) -> TextSpec:
        return cls(str(d["tokenizer"]), int(d["max_length"]))


@dataclass(frozen=True)
class Stage:
    """One named stage of the trunk, in forward order: `until:<name>` freezes up to and including it, and layer
    decay gives it one learning-rate depth. `params` are the full parameter names it holds."""

    name: str
    params: tuple[str, ...]


@runtime_checkable
class Backbone(Protocol):
    source: str  # "torchvision" | "timm" | "hf"
    name: str  # the model name (a folder for "hf")
    modality: str  # "image" | "text"
    model: nn.Module  # the whole classifier, new head included
    head: str  # dotted path of the classifier inside `model` (the new head)

    def stages(self) -> list[Stage]:
        """The trunk's stages in forward order, head excluded (every non-head parameter in exactly one stage)."""

    def preprocess(self) -> TransformSpec | TextSpec:
        """What the loaders must produce: image resize/crop/mean/std/interpolation, or tokenizer + length."""

    def inputs(self, batch: Any) -> Any:
        """A loader batch's inputs -> what `model` (or the frozen prefix) takes: an image tensor, or a dict of
        token tensors (input_ids, attention_mask)."""

    def export(self, folder: Path) -> list[Path]:
        """Write the trained model in the source's own loadable format (torchvision/timm: a safetensors state dict
        that the source's constructor loads; hf: `save_pretrained` + the tokenizer). Returns the files written."""


def meta(backbone: Backbone) -> dict[str, Any]:
    """What a checkpoint records to rebuild the same backbone (source, name, head, input contract)."""
    spec = backbone.preprocess()
    return {
        "source": backbone.source,
        "name": backbone.name,
        "modality": backbone.modality,
        "head": backbone.head,
        "preprocess": spec.to_dict(),
    }
