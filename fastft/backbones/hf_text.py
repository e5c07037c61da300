"""Hugging Face text encoders (`model.source = "hf"`): `AutoModelForSequenceClassification` with a new K-class head
and its fast tokenizer, from a local folder or the hub cache.

Nothing is downloaded when `HF_HUB_OFFLINE=1`: a name that is not a folder is then read from the local hub cache only
(`local_files_only`), and a model missing there is a one-line ModelError naming it.

The split into a frozen prefix and a trainable suffix follows the encoder's stages (embeddings, encoder layers,
pooler): a linear probe's prefix returns the pooled output (what the feature cache stores) and its suffix is the
classifier's dropout + linear layer; a cut after encoder layer k hands the hidden states and the attention mask on.
The prefix always runs in eval mode and without autograd, whatever mode the model is in.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastft.backbones.base import Stage, TextSpec
from fastft.errors import ModelError

log = logging.getLogger("fastft")

_HEAD_NAMES = ("classifier", "score", "classification_head")  # where sequence-classification models keep theirs
_LAYER_LISTS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h")
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class TextClassifier(nn.Module):
    """The whole classifier as fastft sees it: a dict of token tensors in, logits out."""

    def __init__(self, hf: nn.Module, head: str) -> None:
        super().__init__()
        self.hf = hf
        self.fastft_head = f"hf.{head}"

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.hf(**inputs, return_dict=True).logits


class TokenLogits(nn.Module):
    """A TextClassifier taking its token tensors as positional arguments, as ONNX export takes a model's inputs."""

    def __init__(self, model: TextClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _is_folder_name(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().is_dir()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report (the new head's weights are 'missing': expected here) and progress bars."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load(name: str, num_classes: int, labels: list[str] | None) -> tuple[nn.Module, Any, str]:
    """(model, fast tokenizer, the folder they were read from)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import cached_file

    is_folder = _is_folder_name(name)
    if is_folder:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"model.name: Hugging Face model folder not found: {folder}")
        source, local_only = str(folder), True
        where, hint = f"folder {folder}", ""
    else:
        source, local_only = name, _offline()
        where, hint = f"model {name!r}", " (HF_HUB_OFFLINE=1: only the local hub cache is read)" if local_only else ""
    extra = {}
    if labels:
        extra = {"id2label": dict(enumerate(labels)), "label2id": {c: i for i, c in enumerate(labels)}}
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_classes, local_files_only=local_only, ignore_mismatched_sizes=True, **extra
            )
            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=local_only)
            # The tokenizer's folder (TextSpec): the hub cache's snapshot when a name was given.
            resolved = source if is_folder else Path(cached_file(name, "config.json", local_files_only=True)).parent
    except Exception as e:
        raise ModelError(f"model.name: cannot load Hugging Face {where}{hint}: {_first_line(e)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model.name: {where} has no fast tokenizer (tokenizer.json); fastft needs one")
    return model, tokenizer, str(Path(resolved).resolve())


def text_spec(name: str, max_length: int) -> TextSpec:
    """The tokenizer folder of model `name` (a folder, or a hub name read from the local cache) and `max_length`,
    without loading the model: what the data is tokenised with before the model is built.

    Raises:
        ModelError: the folder does not exist, or the name is not in the local hub cache.
    """
    if _is_folder_name(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"model.name: Hugging Face model folder not found: {folder}")
        return TextSpec(str(folder.resolve()), max_length)
    from transformers.utils import cached_file

    try:
        config = cached_file(name, "config.json", local_files_only=_offline())
    except Exception as e:
        raise ModelError(f"model.name: cannot find Hugging Face model {name!r}: {_first_line(e)}") from None
    return TextSpec(str(Path(config).parent.resolve()), max_length)


def _find_head(hf: nn.Module, name: str) -> str:
    for attr in _HEAD_NAMES:
        if isinstance(getattr(hf, attr, None), nn.Module):
            return attr
    raise ModelError(f"model.name: cannot find the classifier of {type(hf).__name__} ({name})")


def _new_head(module: nn.Module, std: float) -> None:
    """A fresh head even when the folder holds a classifier of the same shape (BERT's own initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class HFTextBackbone:
    """A Hugging Face sequence classifier and its fast tokenizer, as a fastft Backbone (see backbones/base.py)."""

    source = "hf"
    modality = "text"

    def __init__(
        self,
        name: str,
        num_classes: int,
        *,
        max_length: int = 128,
        labels: list[str] | None = None,
        new_head: bool = True,
    ) -> None:
        """Raises ModelError naming the folder/model when it cannot be read or does not take `max_length` tokens."""
        self.name = name
        hf, self.tokenizer, self.folder = _load(name, num_classes, labels)
        head = _find_head(hf, name)
        if new_head:
            _new_head(getattr(hf, head), std=getattr(hf.config, "initializer_range", 0.02))
        positions = getattr(hf.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ModelError(f"data.max_length: {max_length} is more than {name} takes ({positions} positions)")
        self.max_length = max_length
        self.model = TextClassifier(hf, head)
        self.head = self.model.fastft_head

    @property
    def hf(self) -> nn.Module:
        return self.model.hf

    def stages(self) -> list[Stage]:
        """embeddings, layer.0 .. layer.N-1, then the encoder's other parts (pooler, ...) in registration order."""
        return text_stages(self.model, self.head)

    def preprocess(self) -> TextSpec:
        return TextSpec(self.folder, self.max_length)

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The token tensors the model takes (the loader's other keys, such as row indices, are left out)."""
        return {k: batch[k] for k in INPUT_KEYS if k in batch}

    def export(self, folder: Path) -> list[Path]:
        """`save_pretrained` of model and tokenizer: the folder loads with AutoModelForSequenceClassification and
        AutoTokenizer `from_pretrained`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = lambda: {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
        before = stamp()
        with _quiet_transformers():
            self.hf.save_pretrained(folder)  # safetensors (sharded with an index when large)
            self.tokenizer.save_pretrained(folder)
        return sorted(p for p, t in stamp().items() if before.get(p) != t)


# --------------------------------------------------------------------------------------------------------------------
# Stages


def _layer_list(base: nn.Module) -> tuple[str, nn.ModuleList] | None:
    for path in _LAYER_LISTS:
        try:
            m = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, nn.ModuleList):
            return path, m
    return None


def text_stages(model: TextClassifier, head: str) -> list[Stage]:
    """Every non-head parameter of `model` in exactly one stage, in forward order."""
    hf = model.hf
    base_name = getattr(hf, "base_model_prefix", "")
    base = getattr(hf, base_name, None) if base_name else None
    if base is None:
        raise ModelError(f"model.name: {type(hf).__name__} has no base encoder ({base_name!r}) to stage")
    root = f"hf.{base_name}."
    found = _layer_list(base)
    layers_path = found[0] if found else None
    stages: list[Stage] = []
    taken: set[str] = set()

    def add(name: str, params: list[str]) -> None:
        params = [p for p in params if p not in taken and not (p == head or p.startswith(head + "."))]
        if params:
            stages.append(Stage(name, tuple(params)))
            taken.update(params)

    embeddings = getattr(base, "embeddings", None)
    if embeddings is not None:
        add("embeddings", [f"{root}embeddings.{n}" for n, _ in embeddings.named_parameters()])
    if found is not None:
        # Parameters of the encoder outside its layers (e.g. a shared relative-position table) are used by every layer.
        container = layers_path.rpartition(".")[0]
        if container:
            add(
                container,
                [
                    f"{root}{container}.{n}"
                    for n, _ in base.get_submodule(container).named_parameters()
                    if not n.startswith(layers_path.rpartition(".")[2] + ".")
                ],
            )
        for i, layer in enumerate(found[1]):
            add(f"layer.{i}", [f"{root}{layers_path}.{i}.{n}" for n, _ in layer.named_parameters()])
    for child, module in base.named_children():
        add(child, [f"{root}{child}.{n}" for n, _ in module.named_parameters()])
    add(base_name, [f"{root}{n}" for n, _ in base.named_parameters(recurse=False)])
    for child, module in hf.named_children():  # e.g. DistilBERT's pre_classifier, between the encoder and the head
        if child != base_name:
            add(child, [f"hf.{child}.{n}" for n, _ in module.named_parameters()])
    return stages


# --------------------------------------------------------------------------------------------------------------------
# Frozen prefix / trainable suffix


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (dropout off) whatever mode its shared submodules are in; restore their modes."""
    training = [m for m in module.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


def _attention_mask(config, hidden: torch.Tensor, mask: torch.Tensor | None):
    """The mask the encoder layers take (what BertModel builds for its attention implementation) from a 0/1 mask."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


class TextPrefix(nn.Module):
    """The frozen part: embeddings and the first encoder layers (and the pooler for a linear probe), run in eval
    mode without autograd. Returns the pooled output (B, hidden) for a probe, else the hidden states and the 0/1
    attention mask."""

    def __init__(self, base: nn.Module, layers: list[nn.Module], *, pooled: bool) -> None:
        super().__init__()
        self.embeddings = base.embeddings
        self.layers = nn.ModuleList(layers)
        self.pooler = base.pooler if pooled else None
        object.__setattr__(self, "_config", base.config)  # not a submodule: the config is no state

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
        mask = inputs.get("attention_mask")
        with torch.no_grad(), _eval_mode(self):
            h = self.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
            if self.layers:
                mask4 = _attention_mask(self._config, h, mask)
                for layer in self.layers:
                    h = layer(h, mask4)
            if self.pooler is not None:
                return self.pooler(h)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        return {"hidden_states": h, "attention_mask": mask}


class TextSuffix(nn.Module):
    """The trainable part after a cut between encoder layers: the remaining layers, the pooler, dropout, classifier."""

    def __init__(self, base: nn.Module, layers: list[nn.Module], dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.pooler = base.pooler
        self.dropout = dropout
        self.classifier = classifier
        object.__setattr__(self, "_config", base.config)

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        h = x["hidden_states"]
        if self.layers:
            mask4 = _attention_mask(self._config, h, x["attention_mask"])
            for layer in self.layers:
                h = layer(h, mask4)
        return self.classifier(self.dropout(self.pooler(h)))


def _bert_layout(hf: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """(base encoder, its layers) when `hf` is laid out as BertForSequenceClassification (embeddings -> layers ->
    pooler -> dropout -> classifier), the layout the split knows how to cut; None otherwise."""
    base = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    found = _layer_list(base) if base is not None else None
    ok = (
        found is not None
        and found[0] == "encoder.layer"
        and getattr(base, "embeddings", None) is not None
        and getattr(base, "pooler", None) is not None
        and isinstance(getattr(hf, "dropout", None), nn.Dropout)
        and isinstance(getattr(hf, "classifier", None), nn.Linear)
    )
    return (base, found[1]) if ok else None


def split_text(backbone: HFTextBackbone, trainable: set[str]):
    """Cut `backbone.model` before the first stage holding a trainable parameter (names in `trainable`).

    Only the head trains: the prefix returns the pooled output and the suffix is dropout + classifier ("head").
    The cut falls after encoder layer k (`until:layer.k`): the prefix returns hidden states + attention mask and the
    suffix runs layers k+1.. , the pooler and the head ("graph", as image models' cuts are called). Everything, or
    the embeddings, trains, or a layout the split does not know: the whole model is the suffix ("none"; frozen
    parameters still get no gradient), the last case logged.

    Raises:
        ModelError: nothing trains.
    """
    from fastft.backbones.split import Split

    model = backbone.model
    names = [n for n, _ in model.named_parameters()]
    if not trainable:
        raise ModelError("nothing to train: every parameter is frozen")
    stages = backbone.stages()
    first = next((i for i, s in enumerate(stages) if trainable.intersection(s.params)), len(stages))
    if len(trainable) == len(names) or first == 0:
        return Split(model, None, model, "none")
    layout = _bert_layout(backbone.hf)
    if layout is None:
        log.warning(
            "fastft: no prefix/suffix split for %s; the whole model runs as trainable", type(backbone.hf).__name__
        )
        return Split(model, None, model, "none")
    base, layers = layout
    hf = backbone.hf
    if first == len(stages):  # only the head trains: a linear probe on the pooled output
        prefix = TextPrefix(base, list(layers), pooled=True)
        return Split(model, prefix, nn.Sequential(hf.dropout, hf.classifier), "head")
    cut = stages[first].name
    k = int(cut.split(".")[1]) if cut.startswith("layer.") else len(layers)  # the pooler is the only later stage
    prefix = TextPrefix(base, list(layers[:k]), pooled=False)
    return Split(model, prefix, TextSuffix(base, list(layers[k:]), hf.dropout, hf.classifier), "graph")
