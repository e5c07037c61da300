"""Build a torchvision backbone, replace its head, freeze it, and split it into a frozen prefix / trainable suffix.

The split is the central idea of fastft: the prefix (everything before the first trainable module) runs in eval
mode without autograd and never enters DDP/DeepSpeed or torch.compile; the suffix is what trains. Both are views
over the one canonical model: parameters are shared, so checkpoints always save ``model.state_dict()``.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastft.config import ModelConfig
from fastft.errors import ModelError

log = logging.getLogger("fastft")

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


# --------------------------------------------------------------------------------------------------------------------
# Building


def list_model_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def resolve_weights(name: str, weights: str) -> Any:
    """Map DEFAULT / an enum name / none to a torchvision weights enum (or None). Paths return None."""
    import torchvision

    if weights.lower() in ("none", "") or _is_path(weights):
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


def _is_path(weights: str) -> bool:
    return weights.endswith((".pt", ".pth", ".safetensors", ".bin")) or "/" in weights


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or torch.load(weights_only=True)."""
    from fastft.errors import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "refusing to unpickle objects that could run code (only tensors and plain containers are loaded)"
        raise CheckpointError(f"cannot load {p}: {msg}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a fastft checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"cannot load {p}: not a state dict of tensors")
    return obj


def build_model(cfg: ModelConfig, num_classes: int, *, image_size: int = 0, pretrained_ok: bool = True) -> nn.Module:
    """Build `cfg.name` with its weights and a new `num_classes` head (nothing frozen yet).

    `image_size` (the crop the loaders produce; 0 = the model's own) sizes models whose input size is fixed by their
    architecture: ViT position embeddings are interpolated to it, MaxViT is rebuilt for it.

    Raises:
        ModelError: unknown model name (with close matches), weights that cannot be had, or an input size the
            architecture cannot take.
    """
    import torchvision

    if cfg.source != "torchvision":
        raise ModelError(f"model.source={cfg.source!r} is not built yet in this version (torchvision only)")
    names = list_model_names()
    if cfg.name not in names:
        close = difflib.get_close_matches(cfg.name, names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelError(f"unknown model {cfg.name!r}{hint}")
    weights = resolve_weights(cfg.name, cfg.weights) if pretrained_ok else None
    try:
        model = torchvision.models.get_model(cfg.name, weights=weights)
    except Exception as e:
        raise ModelError(f"cannot get {cfg.name} weights {weights}: {str(e).splitlines()[0]}") from None
    drop_aux_heads(model)
    if image_size:
        model = fit_input_size(cfg.name, model, image_size)
    if _is_path(cfg.weights):
        state = {k: v for k, v in load_state_file(cfg.weights).items() if not k.startswith(_AUX_PREFIXES)}
        state = _vit_state_to_size(model, state)
        # A backbone file (original classifier) loads before the head is replaced; a fastft export after.
        if _try_load(model, state):
            replace_head(model, num_classes, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
            return model
        replace_head(model, num_classes, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
        if not _try_load(model, state):
            from fastft.checkpoint import describe_mismatch
            from fastft.errors import CheckpointError

            raise CheckpointError(f"{cfg.weights}: does not match {cfg.name} ({describe_mismatch(model, state)})")
        return model
    replace_head(model, num_classes, hidden=cfg.head_hidden, dropout=cfg.head_dropout)
    return model


def fit_input_size(name: str, model: nn.Module, image_size: int) -> nn.Module:
    """The model made to take `image_size` inputs where its architecture fixes the input size, weights kept: a ViT's
    position embeddings are interpolated to the new patch grid (torchvision's `interpolate_embeddings`), a MaxViT is
    rebuilt for the size (its weights do not depend on it). Call before the head is replaced."""
    import torchvision
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
            resized = torchvision.models.get_model(name, weights=None, input_size=(image_size, image_size))
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


def _try_load(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    from fastft.checkpoint import describe_mismatch

    if describe_mismatch(model, state):
        return False
    model.load_state_dict(state, strict=True)
    return True


# --------------------------------------------------------------------------------------------------------------------
# The head


def find_head(model: nn.Module) -> str:
    """Dotted path of the classifier: the last Linear in the module tree (fc, classifier.N, heads.head, head, ...)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if hasattr(model, "classifier") and isinstance(model.classifier, nn.Sequential):
        # squeezenet's classifier ends in a 1x1 conv, not a Linear
        convs = [n for n, m in model.classifier.named_children() if isinstance(m, nn.Conv2d)]
        if convs and last is None:
            return f"classifier.{convs[-1]}"
    if last is None:
        raise ModelError(f"cannot find a classifier in {type(model).__name__}")
    return last


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(get_submodule(model, parent_path), leaf, new)


def replace_head(model: nn.Module, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> str:
    """Replace the classifier with a fresh `num_classes` head; return its path (stored as `model.fastft_head`)."""
    path = find_head(model)
    old = get_submodule(model, path)
    if isinstance(old, nn.Conv2d):  # squeezenet: keep the conv-classifier shape, new class count
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    else:
        in_features = old.in_features
        layers: list[nn.Module] = []
        if hidden > 0:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = hidden
        elif dropout > 0:
            layers.append(nn.Dropout(dropout))
        # the family's own choice of bias (maxvit's classifier has none), so the state dict is torchvision's
        layers.append(nn.Linear(in_features, num_classes, bias=old.bias is not None))
        new = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
    set_submodule(model, path, new)
    model.fastft_head = path  # type: ignore[assignment]
    return path


# --------------------------------------------------------------------------------------------------------------------
# Freezing


class _FrozenBNMixin:
    """A BatchNorm that always normalises with its running statistics and never updates them.

    Installed by swapping the instance's class, so parameter/buffer names and the state dict are unchanged
    (a frozen model still loads into plain torchvision). `train()` cannot switch it back to batch statistics."""

    def train(self, mode: bool = True):
        return super().train(False)


_frozen_bn_classes: dict[type, type] = {}


def _frozen_bn_class(cls: type) -> type:
    if cls not in _frozen_bn_classes:
        _frozen_bn_classes[cls] = type(f"Frozen{cls.__name__}", (_FrozenBNMixin, cls), {})
    return _frozen_bn_classes[cls]


def freeze_bn(m: nn.Module) -> None:
    if not isinstance(m, _FrozenBNMixin):
        m.__class__ = _frozen_bn_class(type(m))
    m.training = False


def unfreeze_bn(m: nn.Module) -> None:
    if isinstance(m, _FrozenBNMixin):
        m.__class__ = m.__class__.__mro__[2]  # (Frozen*, mixin, original)


def is_frozen_bn(m: nn.Module) -> bool:
    return isinstance(m, _FrozenBNMixin)


def freeze(model: nn.Module, policy: str | list[str]) -> tuple[int, int]:
    """Apply a freeze policy; the head always trains. Returns (trainable, total) parameter counts.

    Policies: "none"; "backbone" (linear probe); "until:<module>" (freeze every parameter registered up to and
    including that module, e.g. layer3); or a list of fnmatch patterns of parameter names to freeze.
    Frozen BatchNorm layers (all parameters frozen, or parameter-less inside the frozen range) keep their running
    statistics, even after `model.train()`.
    """
    head = getattr(model, "fastft_head", None) or find_head(model)
    in_head = lambda n: n == head or n.startswith(head + ".")
    names = [n for n, _ in model.named_parameters()]
    if policy == "none":
        frozen = set()
    elif policy == "backbone":
        frozen = {n for n in names if not in_head(n)}
    elif isinstance(policy, str) and policy.startswith("until:"):
        target = policy[len("until:") :]
        modules = dict(model.named_modules())
        if target not in modules or target == "":
            tops = [n for n, _ in model.named_children()]
            close = difflib.get_close_matches(target, list(modules), n=3)
            raise ModelError(
                f"model.freeze: no module {target!r} in {type(model).__name__} "
                f"(top-level: {', '.join(tops)}{'; close: ' + ', '.join(close) if close else ''})"
            )
        owned = {f"{target}.{n}" for n, _ in modules[target].named_parameters()}
        if not owned:
            raise ModelError(f"model.freeze: module {target!r} has no parameters")
        last = max(i for i, n in enumerate(names) if n in owned)
        frozen = {n for n in names[: last + 1] if not in_head(n)}
    elif isinstance(policy, list):
        frozen = {n for n in names if not in_head(n) and any(fnmatch.fnmatchcase(n, p) for p in policy)}
        unmatched = [p for p in policy if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ModelError(f"model.freeze: pattern {unmatched[0]!r} matches no parameter")
    else:
        raise ModelError(f"model.freeze: unknown policy {policy!r}")

    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    # BatchNorm: frozen with its parameters; parameter-less BN follows the modules around it (registration order).
    order = [n for n, _ in model.named_modules()]
    frozen_modules = {n.rpartition(".")[0] for n in frozen}
    last_frozen_idx = max((order.index(m) for m in frozen_modules if m in order), default=-1)
    for i, (_, m) in enumerate(model.named_modules()):
        if not isinstance(m, _BN_TYPES):
            continue
        params = list(m.parameters(recurse=False))
        is_frozen = all(not p.requires_grad for p in params) if params else (i <= last_frozen_idx and policy != "none")
        freeze_bn(m) if is_frozen else unfreeze_bn(m)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# --------------------------------------------------------------------------------------------------------------------
# Splitting into frozen prefix / trainable suffix


@dataclass
class Split:
    """Frozen prefix and trainable suffix over one model. `prefix` is None when nothing before the suffix is frozen."""

    model: nn.Module
    prefix: nn.Module | None
    suffix: nn.Module
    kind: str  # "head" (prefix = model without its head), "graph" (FX cut), "none" (whole model trains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefix is not None:
            with torch.no_grad():
                x = self.prefix(x)
        return self.suffix(x)


class _Headless(nn.Module):
    """Marker type for a shallow copy of the model whose head is nn.Identity (shares every parameter)."""


def _headless_view(model: nn.Module, head: str) -> nn.Module:
    """A copy of `model` that shares all submodules except the head path, where the head becomes Identity."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    node, parts = root, head.split(".")
    for p in parts[:-1]:
        child = copy.copy(node._modules[p])
        child._modules = dict(child._modules)
        node._modules[p] = child
        node = child
    node._modules[parts[-1]] = nn.Identity()
    return root


def split_model(model: nn.Module) -> Split:
    """Cut the model at its first trainable parameter.

    Linear probe: the prefix is the model with its head replaced by Identity, where the head is the model's last
    operation (every torchvision family except squeezenet, whose conv classifier is followed by ReLU, pooling and
    flatten: it takes the graph cut). Partial fine-tune: the model is traced with torch.fx and cut before the first
    node that touches a trainable parameter. The split does not depend on the mode the model is in: the prefix is
    traced in eval mode (stochastic depth and dropout off, always), and the suffix follows `train()`/`eval()` (see
    `_ModeAware`). If tracing fails the whole model becomes the suffix (frozen parts still build no graph because none
    of their inputs or parameters require grad) and the reason is logged.
    """
    head = getattr(model, "fastft_head", None) or find_head(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ModelError("nothing to train: every parameter is frozen")
    total = [n for n, _ in model.named_parameters()]
    if len(trainable) == len(total):
        return Split(model, None, model, "none")
    head_module = get_submodule(model, head)
    only_head = all(n == head or n.startswith(head + ".") for n in trainable)
    if only_head and not isinstance(head_module, nn.Conv2d):
        return Split(model, _headless_view(model, head), head_module, "head")
    try:
        prefix, suffix = _fx_split(model, trainable)
        return Split(model, prefix, suffix, "graph")
    except Exception as e:
        log.warning(
            "fastft: cannot trace %s for a prefix/suffix split (%s); training the whole graph", type(model).__name__, e
        )
        return Split(model, None, model, "none")


def _leaf_types() -> tuple[type, ...]:
    """Modules kept whole when tracing, so their own `self.training` is read at call time, not baked in."""
    from torchvision.ops import StochasticDepth

    return (StochasticDepth,)


def _trace(model: nn.Module):
    """torch.fx graph of `model`; frozen BatchNorm and mode-dependent modules stay leaves."""
    from torch import fx

    leaves = _leaf_types()

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_frozen_bn(m) or isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    return Tracer().trace(model)


def _trace_in_mode(model: nn.Module, training: bool):
    """Trace `model` as if in train (or eval) mode, leaving every module's mode as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        return _trace(model)
    finally:
        for m, mode in modes:
            m.training = mode


class _ModeAware(nn.Module):
    """The trainable suffix when the model's traced code depends on its mode (a `self.training` read outside a leaf
    module, e.g. swin's functional attention dropout): the train-mode graph runs under `train()`, the eval-mode graph
    under `eval()`. Both graphs call the same submodules; only the train graph is registered, so parameters and the
    state dict appear once."""

    def __init__(self, train_graph: nn.Module, eval_graph: nn.Module) -> None:
        super().__init__()
        self.graph = train_graph
        object.__setattr__(self, "_eval_graph", eval_graph)  # shares every submodule of `graph`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x) if self.training else self._eval_graph(x)


def _fx_split(model: nn.Module, trainable: set[str]) -> tuple[nn.Module, nn.Module]:
    from torch import fx

    eval_graph = _trace_in_mode(model, False)
    train_graph = _trace_in_mode(model, True)
    prefix, suffix_eval, cut_eval = _cut(model, eval_graph, trainable)
    if train_graph.python_code("self").src == eval_graph.python_code("self").src:
        return prefix, suffix_eval
    _, suffix_train, cut_train = _cut(model, train_graph, trainable)
    if cut_train != cut_eval:
        raise RuntimeError(f"train and eval graphs cut at different values ({cut_train} vs {cut_eval})")
    assert isinstance(suffix_train, fx.GraphModule)
    return prefix, _ModeAware(suffix_train, suffix_eval)


def _cut(model: nn.Module, graph, trainable: set[str]) -> tuple[nn.Module, nn.Module, str]:
    """(prefix, suffix, name of the value handed from one to the other) of one traced graph."""
    from torch import fx

    nodes = list(graph.nodes)
    modules = dict(model.named_modules())

    def touches_trainable(node: fx.Node) -> bool:
        if node.op == "call_module":
            return any(p.requires_grad for p in modules[node.target].parameters())
        if node.op == "get_attr":
            return node.target in trainable
        return False

    cut = next(i for i, n in enumerate(nodes) if touches_trainable(n))
    # Pull get_attr nodes of frozen tensors used after the cut into the suffix by copying: they are constants.
    prefix_nodes = [n for n in nodes[:cut] if n.op != "get_attr" or all(nodes.index(u) < cut for u in n.users)]
    prefix_set = set(prefix_nodes)
    crossing = [n for n in prefix_nodes if n.op != "get_attr" and any(u not in prefix_set for u in n.users)]
    if len(crossing) != 1 or crossing[0].op == "placeholder":
        raise RuntimeError(f"cut before {nodes[cut].name} crosses {len(crossing)} values")

    pg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in prefix_nodes:
        env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(env[crossing[0]])
    sg = fx.Graph()
    senv: dict[fx.Node, fx.Node] = {crossing[0]: sg.placeholder("features")}
    for n in nodes:
        if n in prefix_set or n.op == "placeholder":
            continue
        senv[n] = sg.node_copy(n, lambda a: senv[a])
    prefix, suffix = fx.GraphModule(model, pg, "FrozenPrefix"), fx.GraphModule(model, sg, "TrainableSuffix")
    return prefix, suffix, crossing[0].name


def count_parameters(module: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total
