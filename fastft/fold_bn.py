"""BatchNorm folded into the convolution before it, for a frozen prefix that only ever runs in eval mode.

In eval mode a BatchNorm is a per-channel affine map with fixed coefficients, so `bn(conv(x))` equals one convolution
whose weight and bias absorb them (torch.nn.utils.fusion.fuse_conv_bn_eval). On a ResNet-50 this takes the BatchNorm
passes out of the forward: about 10% of a frozen forward on a 2-core CPU. fastft runs the frozen prefix this way in
the feature-cache build and in every step that runs it (fastft.inputs); the folded convolutions hold their own copy
of those weights. The result differs from the unfolded
forward by rounding only (about 1e-7 relative in fp32).

The folded module is a new torch.fx GraphModule over the traced prefix: the folded convolutions are new modules (new
weights) and every other leaf is shared with the prefix, which is left exactly as it was (its state dict, its
fingerprint and what a checkpoint saves do not change). Only a plain BatchNorm (1d/2d/3d, or fastft's frozen version
of one) directly after a plain convolution whose output feeds nothing else is folded; subclasses that do more (timm's
BatchNormAct2d, Conv2dSame) are left alone, as is a model that cannot be traced."""

from __future__ import annotations

import functools
import logging

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fastft.backbones import trace_options
from fastft.backbones.freeze import is_frozen_bn
from fastft.backbones.split import _trace as split_trace

log = logging.getLogger("fastft")

_PAIRS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _plain_bn_type(m: nn.Module) -> type:
    """The BatchNorm class `m` computes as: its own, or the one fastft's freezing wrapped."""
    return type(m).__mro__[2] if is_frozen_bn(m) else type(m)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    bn_type = _PAIRS.get(type(conv))
    return (
        bn_type is not None
        and _plain_bn_type(bn) is bn_type
        and not bn.training  # a BatchNorm on batch statistics is no affine map (a frozen one never is)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _fused(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A new convolution computing bn(conv(x)); a convolution's mode does not change what it computes, so one in
    training mode (a model the loop has put in train()) is folded as it is in eval."""
    mode = conv.training
    conv.training = False
    try:
        fused = fuse_conv_bn_eval(conv, bn)
    finally:
        conv.training = mode
    fused.training = False
    return fused


def fold_bn(prefix: nn.Module) -> tuple[nn.Module, int]:
    """(a module computing `prefix`'s eval-mode forward with its foldable BatchNorms folded, how many were folded).
    Returns `prefix` itself and 0 when there is nothing to fold or it cannot be traced. Only BatchNorms in eval
    mode fold, and they must stay so while the result is used (fastft's frozen ones cannot leave it)."""
    if isinstance(prefix, fx.GraphModule):  # a graph cut of the model: traced already, with fastft's leaves
        traced = prefix.graph
    else:
        opts = trace_options(prefix)
        if opts.untraceable:
            return prefix, 0
        try:
            traced = split_trace(prefix, opts)  # frozen BatchNorms and the backbone's own leaves stay whole
        except Exception as e:  # untraceable control flow: run it as it is
            log.debug("fastft: BatchNorm folding skipped (%s: %s)", type(prefix).__name__, e)
            return prefix, 0
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    modules = dict(prefix.named_modules())
    folded: dict[str, nn.Module] = {}
    for node in traced.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and len(src.users) == 1
            and not node.kwargs
            and len(node.args) == 1
            and _foldable(modules[src.target], modules[node.target])
        ):
            name = f"_fastft_folded_{len(folded)}"
            folded[name] = _fused(modules[src.target], modules[node.target])
            conv_out = env.pop(src)  # the copied conv call becomes the folded module's call, the BN disappears
            new = graph.call_module(name, conv_out.args, conv_out.kwargs)
            graph.erase_node(conv_out)
            env[node] = new
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    if not folded:
        return prefix, 0
    graph.lint()
    # Every module and attribute the graph uses, by its qualified name: the folded convolutions, and the prefix's own
    # objects (shared, not copied; GraphModule builds fresh containers around them, so the prefix is not touched).
    owned = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    root = {t: folded[t] if t in folded else functools.reduce(getattr, t.split("."), prefix) for t in owned}
    out = fx.GraphModule(root, graph, class_name="FoldedPrefix")
    out.training = False
    return out, len(folded)
