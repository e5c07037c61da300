"""Gradual unfreezing: `optim.unfreeze = ["2:layer4:0.1", "4:layer3:0.01"]` makes a module trainable from the
start of an epoch (counted from 1, as logged), with its own LR factor."""

from __future__ import annotations

from torch import nn

from fastft.backbones.freeze import _BN_TYPES, unfreeze_bn
from fastft.config import UnfreezeStep, parse_unfreeze  # noqa: F401 — re-exported
from fastft.errors import ConfigError


def unfreeze_module(model: nn.Module, name: str) -> list[str]:
    """Make every parameter of `name` trainable and its BatchNorm layers update statistics again.

    Returns the names of the parameters that became trainable (registration order)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        tops = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"optim.unfreeze: no module {name!r} in the model (top-level: {tops})") from None
    new = []
    for n, p in module.named_parameters():
        if not p.requires_grad:
            p.requires_grad_(True)
            new.append(f"{name}.{n}")
    for m in module.modules():
        if isinstance(m, _BN_TYPES):
            unfreeze_bn(m)
    return new
