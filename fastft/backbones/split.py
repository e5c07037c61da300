"""The frozen-prefix / trainable-suffix split with torch.fx, model-agnostic (the head path and the tracer's leaf
modules come from the source).

The split is the central idea of fastft: the prefix (everything before the first trainable module) runs in eval
mode without autograd and never enters DDP/DeepSpeed or torch.compile; the suffix is what trains. Both are views
over the one canonical model: parameters are shared, so checkpoints always save ``model.state_dict()``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastft.backbones.freeze import get_submodule, in_head, is_frozen_bn
from fastft.errors import ModelError

log = logging.getLogger("fastft")


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


@dataclass(frozen=True)
class TraceOptions:
    """What the tracer must keep whole: modules whose forward cannot be traced or reads `self.training` (stochastic
    depth), and functions to call opaquely (timm registers both for its own layers)."""

    leaf_types: tuple[type, ...] = ()
    autowrap_functions: tuple[Callable, ...] = ()
    untraceable: str = ""  # why the model must not be traced (the whole model is then the trainable part)
    leaf_names: frozenset[str] = frozenset()  # modules kept whole by name (activation-checkpointed blocks)


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


def split_model(model: nn.Module, *, head: str, trace: TraceOptions = TraceOptions()) -> Split:
    """Cut the model at its first trainable parameter.

    Linear probe: the prefix is the model with its head replaced by Identity, where the head is the model's last
    operation (squeezenet's conv classifier is followed by ReLU, pooling and flatten: it takes the graph cut).
    Partial fine-tune: the model is traced with torch.fx and cut before the first node that touches a trainable
    parameter. The split does not depend on the mode the model is in: the prefix is traced in eval mode (stochastic
    depth and dropout off, always), and the suffix follows `train()`/`eval()` (see `_ModeAware`). If tracing fails
    the whole model becomes the suffix (frozen parts still build no graph because none of their inputs or parameters
    require grad) and the reason is logged.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ModelError("nothing to train: every parameter is frozen")
    total = [n for n, _ in model.named_parameters()]
    if len(trainable) == len(total):
        return Split(model, None, model, "none")
    head_module = get_submodule(model, head)
    only_head = all(in_head(n, head) for n in trainable)
    if only_head and not isinstance(head_module, nn.Conv2d):
        return Split(model, _headless_view(model, head), head_module, "head")
    if trace.untraceable:
        log.info("fastft: no prefix/suffix graph split (%s); training the whole graph", trace.untraceable)
        return Split(model, None, model, "none")
    try:
        prefix, suffix = _fx_split(model, trainable, trace)
        return Split(model, prefix, suffix, "graph")
    except Exception as e:
        log.warning(
            "fastft: cannot trace %s for a prefix/suffix split (%s); training the whole graph", type(model).__name__, e
        )
        return Split(model, None, model, "none")


def _trace(model: nn.Module, trace: TraceOptions):
    """torch.fx graph of `model`; frozen BatchNorm and mode-dependent or untraceable modules stay leaves."""
    from torch import fx
    from torchvision.ops import StochasticDepth  # reads self.training at call time

    leaves = (StochasticDepth, *trace.leaf_types)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if is_frozen_bn(m) or isinstance(m, leaves) or qualname in trace.leaf_names:
                return True
            return super().is_leaf_module(m, qualname)

    # Optional forward arguments (timm's ViT: attn_mask, is_causal) take their defaults, as in `model(x)`.
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return Tracer(autowrap_functions=trace.autowrap_functions).trace(model, concrete_args=concrete or None)


def _trace_in_mode(model: nn.Module, training: bool, trace: TraceOptions):
    """Trace `model` as if in train (or eval) mode, leaving every module's mode as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        return _trace(model, trace)
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


def _fx_split(model: nn.Module, trainable: set[str], trace: TraceOptions) -> tuple[nn.Module, nn.Module]:
    from torch import fx

    eval_graph = _trace_in_mode(model, False, trace)
    train_graph = _trace_in_mode(model, True, trace)
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
