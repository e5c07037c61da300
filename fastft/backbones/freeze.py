"""Model-agnostic pieces every image source shares: the head's path and a fresh head, stages, and freeze policies
with frozen BatchNorm. Nothing here knows a model family: the head path and the stages come from the source."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from torch import nn

from fastft.backbones.base import Stage
from fastft.errors import ModelError

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def new_head(old: nn.Module, num_classes: int, *, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """A fresh `num_classes` classifier in place of `old` (a Linear, or squeezenet's 1x1 conv): optionally
    Linear -> ReLU -> Dropout before it."""
    if isinstance(old, nn.Conv2d):  # squeezenet: keep the conv-classifier shape, new class count
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
    in_features = old.in_features
    layers: list[nn.Module] = []
    if hidden > 0:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = hidden
    elif dropout > 0:
        layers.append(nn.Dropout(dropout))
    # the family's own choice of bias (maxvit's classifier has none), so the state dict is the source's
    layers.append(nn.Linear(in_features, num_classes, bias=old.bias is not None))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


# --------------------------------------------------------------------------------------------------------------------
# Stages


def name_stages(model: nn.Module, groups: Sequence[Sequence[str]], head: str) -> list[Stage]:
    """Stages from parameter-name groups (forward order, head excluded), each named by the shortest module path that
    holds exactly its parameters (`stages.0`, `layer3`) or else, `until:<that module>` (every parameter registered up
    to and including it) freezing the same parameters as `until:<stage>` (a stem of loose layers: `bn1`); otherwise
    `stage<i>`."""
    names = [n for n, _ in model.named_parameters() if not in_head(n, head)]
    position = {n: i for i, n in enumerate(names)}
    modules = dict(model.named_modules())
    stages: list[Stage] = []
    done: set[str] = set()
    for i, group in enumerate(groups):
        done |= set(group)
        common = _common_prefix(sorted(n.rpartition(".")[0] for n in group))
        last = max(group, key=position.__getitem__).rpartition(".")[0]
        candidates = [c for c in dict.fromkeys([*_ancestors(common), *_ancestors(last)]) if c in modules]
        candidates = [c for c in candidates if not in_head(head, c)]  # `head` holds the classifier: not a stage name
        exact = [c for c in candidates if _owned(modules, c, position) == set(group)]
        until = [c for c in candidates if _until_module(modules, c, names, position) == done]
        stages.append(Stage((exact + until + [f"stage{i}"])[0], tuple(group)))
    return stages


def _owned(modules: dict[str, nn.Module], target: str, position: dict[str, int]) -> set[str]:
    return {f"{target}.{n}" for n, _ in modules[target].named_parameters() if f"{target}.{n}" in position}


def _ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _until_module(modules: dict[str, nn.Module], target: str, names: list[str], position: dict[str, int]) -> set[str]:
    owned = [position[n] for n in _owned(modules, target, position)]
    return set(names[: max(owned) + 1]) if owned else set()


# Containers whose children are the real stages (torchvision: regnet trunk, vit encoder layers, the `features` of
# vgg/efficientnet/mobilenet/convnext/swin/densenet).
_EXPAND = ("features", "trunk_output", "encoder", "layers")


def module_stages(model: nn.Module, head: str) -> list[list[str]]:
    """Parameter names grouped into stages in registration order, head excluded: consecutive leaf modules (a stem's
    conv + bn) share a stage; a module with sub-modules is one stage; the containers named in _EXPAND are opened."""
    out: list[list[str]] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            out.append(pending.copy())
            pending.clear()

    def visit(module: nn.Module, prefix: str) -> None:
        pending.extend(prefix + n for n, _ in module.named_parameters(recurse=False) if not in_head(prefix + n, head))
        for name, child in module.named_children():
            full = prefix + name
            names = [f"{full}.{n}" for n, _ in child.named_parameters() if not in_head(f"{full}.{n}", head)]
            if not names:
                continue  # parameter-free, or only the head
            if name in _EXPAND:
                flush()
                visit(child, full + ".")
                flush()
            elif not any(True for c in child.children() if any(True for _ in c.parameters())):
                pending.extend(names)  # a leaf such as conv/bn/ln joins its neighbours
            else:
                flush()
                out.append(names)

    visit(model, "")
    flush()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Freezing


class _FrozenBNMixin:
    """A BatchNorm that always normalises with its running statistics and never updates them.

    Installed by swapping the instance's class, so parameter/buffer names and the state dict are unchanged
    (a frozen model still loads into the plain source model). `train()` cannot switch it back to batch statistics."""

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


def is_bn(m: nn.Module) -> bool:
    """BatchNorm layers, timm's BatchNormAct2d (a BatchNorm2d subclass) included."""
    return isinstance(m, _BN_TYPES)


def freeze(
    model: nn.Module, policy: str | list[str], *, head: str, stages: Sequence[Stage] | None = None
) -> tuple[int, int]:
    """Apply a freeze policy; the head always trains. Returns (trainable, total) parameter counts.

    Policies: "none"; "backbone" (linear probe); "until:<module or stage>" (freeze every parameter registered up to
    and including that module, e.g. layer3, or every stage up to and including that one); or a list of fnmatch
    patterns of parameter names to freeze. Frozen BatchNorm layers (all parameters frozen, or parameter-less inside
    the frozen range) keep their running statistics, even after `model.train()`.
    """
    names = [n for n, _ in model.named_parameters()]
    if policy == "none":
        frozen = set()
    elif policy == "backbone":
        frozen = {n for n in names if not in_head(n, head)}
    elif isinstance(policy, str) and policy.startswith("until:"):
        frozen = _frozen_until(model, policy[len("until:") :], names, head, stages or [])
    elif isinstance(policy, list):
        frozen = {n for n in names if not in_head(n, head) and any(fnmatch.fnmatchcase(n, p) for p in policy)}
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
        if not is_bn(m):
            continue
        params = list(m.parameters(recurse=False))
        is_frozen = all(not p.requires_grad for p in params) if params else (i <= last_frozen_idx and policy != "none")
        freeze_bn(m) if is_frozen else unfreeze_bn(m)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _frozen_until(model: nn.Module, target: str, names: list[str], head: str, stages: Sequence[Stage]) -> set[str]:
    modules = dict(model.named_modules())
    if target and target in modules:
        owned = {f"{target}.{n}" for n, _ in modules[target].named_parameters()}
        if not owned:
            raise ModelError(f"model.freeze: module {target!r} has no parameters")
        last = max(i for i, n in enumerate(names) if n in owned)
        return {n for n in names[: last + 1] if not in_head(n, head)}
    stage_names = [s.name for s in stages]
    if target in stage_names:
        upto = stages[: stage_names.index(target) + 1]
        return {n for s in upto for n in s.params}
    tops = [n for n, _ in model.named_children()]
    close = difflib.get_close_matches(target, stage_names + list(modules), n=3)
    listed = f"stages: {', '.join(stage_names)}" if stage_names else f"top-level: {', '.join(tops)}"
    raise ModelError(
        f"model.freeze: no module {target!r} in {type(model).__name__} "
        f"({listed}{'; close: ' + ', '.join(close) if close else ''})"
    )


def count_parameters(module: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total
