"""Activation checkpointing of the trainable blocks (`model.activation_checkpointing`): each block that trains keeps
only its input during the forward pass and recomputes its activations in the backward pass, with
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` (less memory, about one more forward of compute). The
recomputation replays the forward's random state (the same stochastic-depth and dropout masks) and leaves BatchNorm
running statistics as the forward left them (updated once per step, as without checkpointing).

torchvision models: the blocks of the families below whose parameters all train. Their `forward` is rebound on the
instance (a bound method: `copy.deepcopy` rebinds it to the copy; the class, parameter names and state dict do not
change), and the prefix/suffix split keeps them whole (fx leaves), so the suffix, plain or traced, calls them as
modules. The frozen prefix runs under no_grad and is never checkpointed; a partly frozen block is not either (its
frozen part must stay in the prefix). timm models use timm's own `set_grad_checkpointing` (fastft.backbones.timm).
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastft.config import ModelConfig
from fastft.errors import ModelError

log = logging.getLogger("fastft")

FAMILIES = "resnet, resnext, wide_resnet, vit, convnext, swin, efficientnet, regnet"


def enabled(cfg: ModelConfig) -> bool:
    """`model.activation_checkpointing`, or its old name `model.grad_checkpointing`."""
    return cfg.activation_checkpointing or cfg.grad_checkpointing


def block_types() -> tuple[type, ...]:
    """The torchvision blocks that are checkpointed: each takes one tensor and returns one."""
    from torchvision.models.convnext import CNBlock
    from torchvision.models.efficientnet import FusedMBConv, MBConv
    from torchvision.models.regnet import ResBottleneckBlock
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.swin_transformer import SwinTransformerBlock
    from torchvision.models.vision_transformer import EncoderBlock

    return (
        BasicBlock,
        Bottleneck,
        EncoderBlock,
        CNBlock,
        SwinTransformerBlock,
        MBConv,
        FusedMBConv,
        ResBottleneckBlock,
    )


def check_supported(name: str, model: nn.Module) -> None:
    """Raises ModelError when `model` (a torchvision model) has no block this module knows how to checkpoint."""
    if not any(isinstance(m, block_types()) for m in model.modules()):
        raise ModelError(f"model.activation_checkpointing: {name} has no checkpointable blocks (families: {FAMILIES})")


def trainable_blocks(model: nn.Module) -> list[str]:
    """Names of the checkpointable blocks whose parameters all train."""
    kinds = block_types()
    return [
        n for n, m in model.named_modules() if isinstance(m, kinds) and all(p.requires_grad for p in m.parameters())
    ]


def apply(model: nn.Module, *, on: bool) -> frozenset[str]:
    """Checkpoint the blocks of `model` that train (and only those: an earlier call's choice is undone first).

    Call before each prefix/suffix split (the set changes when an unfreeze moves the cut); returns the names, which the
    split must keep whole."""
    names = trainable_blocks(model) if on else []
    for m in model.modules():
        if "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) is _checkpointed_forward:
            del m.forward
    for n in names:
        block = model.get_submodule(n)
        block.forward = types.MethodType(_checkpointed_forward, block)
    if on:
        log.info("fastft: activation checkpointing of %d trainable blocks", len(names))
    return frozenset(names)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)  # evaluation keeps nothing for a backward pass anyway
    # Eager recomputation would update BatchNorm running statistics a second time; under torch.compile the compiler
    # recomputes from its graph, where the update happens once (and dynamo takes no context_fn).
    kw = {} if torch.compiler.is_compiling() else {"context_fn": lambda: (contextlib.nullcontext(), _KeepStats(self))}
    return checkpoint(forward, self, *args, use_reentrant=False, **kw, **kwargs)


class _KeepStats:
    """The recomputation's context: the block's BatchNorm running statistics come out as they went in."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __enter__(self) -> None:
        bns = [m for m in self.block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        self.saved = [(b, b.detach().clone()) for m in bns for b in m.buffers(recurse=False)]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for b, value in self.saved:
                b.copy_(value)
