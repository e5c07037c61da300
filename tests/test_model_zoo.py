"""Every torchvision classifier family under every freeze policy, split exactly as the training loop splits it.

For each (model, policy), with seeded random weights made non-trivial (layer scale 1, so residual branches matter;
stochastic depth at 0.5, so a block that is wrongly dropped shows) and the model left in train mode, as
`train.py` leaves it before `split_model`:
    (a) prefix -> suffix in eval mode equals the plain `model.eval()` output (rtol 1e-4, atol 1e-5: the same ops,
        regrouped by the cut);
    (b) two evaluation passes are bit-identical;
    (c) one optimizer step, run as the loop runs it (prefix in eval under inference_mode, suffix in train), changes
        exactly the trainable tensors that got a gradient and leaves every frozen parameter and frozen BatchNorm
        buffer bit-identical; where the suffix has active stochastic depth or dropout, two train-mode passes differ;
    (d) where the feature cache applies, the cached features equal the prefix output in eval mode (fp32, exact);
    (e) the state dict loads (strict) into a plain torchvision model of that name with the new head shape, which
        then gives the same eval output.

`make test` runs the smallest member of every family; `make test-zoo` (FASTFT_TEST_ZOO=all) runs every name.
"""

from __future__ import annotations

import copy
import functools
import os

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from fastft.config import ModelConfig
from fastft.model import build_model, freeze, is_frozen_bn, split_model
from fastft.unfreeze import unfreeze_module

K = 5  # classes of the new head

# family representative -> (input size, the "until:" module in the middle of its backbone)
FAMILIES: dict[str, tuple[int, str]] = {
    "resnet18": (32, "layer2"),
    "resnext50_32x4d": (32, "layer2"),
    "wide_resnet50_2": (32, "layer2"),
    "regnet_y_400mf": (32, "trunk_output.block2"),
    "mobilenet_v2": (32, "features.7"),
    "mobilenet_v3_small": (32, "features.6"),
    "mnasnet0_5": (32, "layers.9"),
    "shufflenet_v2_x0_5": (32, "stage3"),
    "squeezenet1_0": (64, "features.7"),
    "densenet121": (32, "features.denseblock2"),
    "efficientnet_b0": (32, "features.4"),
    "efficientnet_v2_s": (32, "features.4"),
    "convnext_tiny": (32, "features.4"),
    "vit_b_16": (32, "encoder.layers.encoder_layer_5"),
    "swin_t": (32, "features.3"),
    "swin_v2_t": (32, "features.3"),
    "maxvit_t": (224, "blocks.1"),
    "googlenet": (64, "inception4a"),
    "inception_v3": (80, "Mixed_6a"),
    "alexnet": (64, "features.5"),
    "vgg11": (32, "features.10"),
}
POLICIES = ("backbone", "until", "none")


def _family(name: str) -> str:
    """The representative in FAMILIES whose architecture `name` shares."""
    prefixes = [
        ("resnext", "resnext50_32x4d"),
        ("wide_resnet", "wide_resnet50_2"),
        ("resnet", "resnet18"),
        ("regnet", "regnet_y_400mf"),
        ("mobilenet_v2", "mobilenet_v2"),
        ("mobilenet_v3", "mobilenet_v3_small"),
        ("mnasnet", "mnasnet0_5"),
        ("shufflenet", "shufflenet_v2_x0_5"),
        ("squeezenet", "squeezenet1_0"),
        ("densenet", "densenet121"),
        ("efficientnet_v2", "efficientnet_v2_s"),
        ("efficientnet", "efficientnet_b0"),
        ("convnext", "convnext_tiny"),
        ("vit", "vit_b_16"),
        ("swin_v2", "swin_v2_t"),
        ("swin", "swin_t"),
        ("maxvit", "maxvit_t"),
        ("googlenet", "googlenet"),
        ("inception", "inception_v3"),
        ("alexnet", "alexnet"),
        ("vgg", "vgg11"),
    ]
    return next(rep for prefix, rep in prefixes if name.startswith(prefix))


def _cases() -> list[tuple[str, int, str]]:
    names = list(FAMILIES)
    if os.environ.get("FASTFT_TEST_ZOO") == "all":
        names = torchvision.models.list_models(module=torchvision.models)
    cases = []
    for name in names:
        size, until = FAMILIES[_family(name)]
        if name.startswith("vit") and name.endswith("14"):
            size = 28
        for policy in POLICIES:
            cases.append((name, size, f"until:{until}" if policy == "until" else policy))
    return cases


def _build(name: str, size: int) -> nn.Module:
    """A fresh copy of the seeded model (built once per name: the cases of one name run one after another)."""
    return copy.deepcopy(_built(name, size))


@functools.lru_cache(maxsize=1)
def _built(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, weights="none"), K, image_size=size)
    for m in model.modules():
        if type(m).__name__ == "CNBlock":  # ConvNeXt: layer scale 1 (torchvision starts at 1e-6: branches vanish)
            m.layer_scale.data.fill_(1.0)
        if isinstance(m, torchvision.ops.StochasticDepth):
            m.p = 0.5
    # Non-trivial BatchNorm statistics, so a frozen BN that normalises with batch statistics shows.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            g = torch.Generator().manual_seed(1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _with_parameters(model: nn.Module, policy: str) -> str:
    """`until:<m>` moved to the next sibling of `m` that has parameters (a family's variants number their layers
    differently: vgg13's features.11 is a ReLU where vgg11's is a conv)."""
    if not policy.startswith("until:"):
        return policy
    parent, _, leaf = policy[len("until:") :].rpartition(".")
    siblings = list(model.get_submodule(parent).named_children())
    start = [n for n, _ in siblings].index(leaf)
    name = next(n for n, m in siblings[start:] if any(True for _ in m.parameters()))
    return f"until:{parent + '.' if parent else ''}{name}"


def _frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen parameter and every buffer of a frozen BatchNorm, cloned."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for mn, m in model.named_modules():
        if is_frozen_bn(m):
            out.update({f"{mn}.{bn}": b.clone() for bn, b in m.named_buffers(recurse=False)})
    return out


def _eval(split, x: torch.Tensor) -> torch.Tensor:
    if split.prefix is not None:
        split.prefix.eval()
    split.suffix.eval()
    with torch.no_grad():
        return split.suffix(split.prefix(x)) if split.prefix is not None else split.suffix(x)


def _train_logits(split, x: torch.Tensor) -> torch.Tensor:
    """One training forward exactly as the loop runs it."""
    if split.prefix is not None:
        split.prefix.eval()
        with torch.inference_mode():
            feats = split.prefix(x)
        x = feats.clone()
    split.suffix.train()
    return split.suffix(x)


def _has_active_randomness(module: nn.Module) -> bool:
    return any(
        (isinstance(m, torchvision.ops.StochasticDepth) and m.p > 0) or (isinstance(m, nn.Dropout) and m.p > 0)
        for m in module.modules()
    )


@pytest.mark.parametrize(("name", "size", "policy"), _cases(), ids=lambda v: str(v))
def test_family_under_policy(name: str, size: int, policy: str) -> None:
    model = _build(name, size)
    freeze(model, _with_parameters(model, policy))
    assert model.training  # as the loop leaves it: the split must not depend on the mode
    split = split_model(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, size, size, generator=g)  # an odd batch

    # (a) the split in eval mode is the model in eval mode
    model.eval()
    with torch.no_grad():
        reference = model(x)
    out = _eval(split, x)
    assert out.shape == (3, K)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    # (b) evaluation is deterministic
    torch.manual_seed(123)  # another RNG state: a pass that draws random numbers would differ
    assert torch.equal(_eval(split, x), out)

    # (c) one step changes exactly what trains; frozen tensors and frozen BN statistics stay bit-identical
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before_frozen = _frozen_state(model)
    before_trainable = {n: p.detach().clone() for n, p in trainable.items()}
    model.train()
    if _has_active_randomness(split.suffix):
        torch.manual_seed(5)
        first = _train_logits(split, x).detach()
        torch.manual_seed(6)
        assert not torch.equal(_train_logits(split, x).detach(), first), "train-mode randomness is off in the suffix"
    optimizer = torch.optim.SGD(list(trainable.values()), lr=0.1)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(_train_logits(split, x), torch.tensor([0, 1, 2]))
    loss.backward()
    # Batch statistics of a few pixels can give huge gradients; clipped, the step stays finite.
    nn.utils.clip_grad_norm_(trainable.values(), 1.0)
    # A step smaller than the parameter's float spacing cannot show: only updates above 1e-5 of the tensor count.
    moved = {
        n for n, p in trainable.items() if p.grad is not None and (0.1 * p.grad).abs().max() > 1e-5 * p.abs().max()
    }
    optimizer.step()
    for n, t in _frozen_state(model).items():
        assert torch.equal(t, before_frozen[n]), f"frozen {n} changed"
    changed = {n for n, p in trainable.items() if not torch.equal(p.detach(), before_trainable[n])}
    assert moved <= changed, sorted(moved - changed)[:5]
    assert changed, "nothing trained"
    if policy == "backbone":  # (elsewhere the clipped step may leave the head's update below float spacing)
        assert all(n.startswith(model.fastft_head) for n in changed)
    if policy == "none":
        assert split.prefix is None
    else:
        assert len(before_frozen) > 0

    # (d) the feature cache stores the prefix's eval output
    if split.prefix is not None and policy == "backbone":
        from fastft.features import _compute_shard
        from fastft.parallel.env import DistEnv
        from fastft.precision import Precision

        class Source:
            def batches(self):
                yield 0, x

        table = _compute_shard(
            split.prefix,
            Source(),
            env=DistEnv(device=torch.device("cpu")),
            precision=Precision(torch.float32, "cpu"),
            channels_last=False,
            allocate=lambda shape: np.zeros((1, 3, *shape), dtype=np.float32),
        )
        model.train()  # the cache must not depend on the mode the model was left in
        split.prefix.eval()
        with torch.no_grad():
            expected = split.prefix(x)
        assert torch.equal(torch.from_numpy(table[0]), expected)

    # (e) the state dict is a plain torchvision model's, with the new head
    extra = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name.startswith("vit"):
        extra["image_size"] = size
    if name.startswith("maxvit"):
        extra["input_size"] = (size, size)
    plain = torchvision.models.get_model(name, weights=None, num_classes=K, **extra)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "until", "unfreeze"),
    [("convnext_tiny", "features.5", "features.5"), ("swin_t", "features.5", "features.5")],
)
def test_suffix_randomness_follows_the_mode_after_an_unfreeze(name: str, until: str, unfreeze: str) -> None:
    """The loop re-splits after an unfreeze while the model is in eval mode (left there by the last evaluation):
    the new suffix's stochastic depth must still be on in training and off in evaluation."""
    size = FAMILIES[name][0]
    model = _build(name, size)
    freeze(model, f"until:{until}")
    model.eval()
    unfreeze_module(model, unfreeze)
    split = split_model(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    a = _train_logits(split, x).detach()
    torch.manual_seed(8)
    b = _train_logits(split, x).detach()
    assert not torch.equal(a, b)
    assert torch.equal(_eval(split, x), _eval(split, x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(_eval(split, x), model(x), rtol=1e-4, atol=1e-5)
