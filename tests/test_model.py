"""Model building, head replacement, freezing (incl. frozen BatchNorm) and the frozen-prefix/trainable-suffix split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastft.config import ModelConfig
from fastft.errors import CheckpointError, ModelError
from fastft.model import build_model, find_head, freeze, is_frozen_bn, split_model


def _model(name: str = "resnet18", classes: int = 5, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, weights="none", **kw), classes)


@pytest.mark.parametrize(
    ("name", "head", "size"),
    [
        ("resnet18", "fc", 64),
        ("regnet_y_400mf", "fc", 64),
        ("mobilenet_v3_small", "classifier.3", 64),
        ("efficientnet_b0", "classifier.1", 64),
        ("convnext_tiny", "classifier.2", 64),
        ("densenet121", "classifier", 64),
        ("vit_b_16", "heads.head", 224),
        ("swin_t", "head", 64),
        ("squeezenet1_1", "classifier.1", 64),
        ("shufflenet_v2_x0_5", "fc", 64),
    ],
)
def test_head_replaced_for_every_family(name: str, head: str, size: int) -> None:
    model = _model(name, classes=7)
    assert model.fastft_head == head
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)


def test_head_with_hidden_layer_and_dropout() -> None:
    model = _model(head_hidden=32, head_dropout=0.5)
    head = model.get_submodule(model.fastft_head)
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert head[0].in_features == 512 and head[-1].out_features == 5


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'resnet5'.*resnet50"):
        build_model(ModelConfig(name="resnet5", weights="none"), 3)


def test_unknown_weights_name_lists_choices() -> None:
    with pytest.raises(ModelError, match=r"IMAGENET1K_V3.*IMAGENET1K_V1"):
        build_model(ModelConfig(name="resnet18", weights="IMAGENET1K_V3"), 3)


def test_freeze_backbone_trains_only_head() -> None:
    model = _model()
    trainable, total = freeze(model, "backbone")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"fc.weight", "fc.bias"}
    assert trainable == 512 * 5 + 5 and total == sum(p.numel() for p in model.parameters())
    assert all(is_frozen_bn(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_freeze_until_layer3_trains_exactly_layer4_and_head() -> None:
    model = _model()
    freeze(model, "until:layer3")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    assert trainable == expected
    bns = {n: is_frozen_bn(m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(frozen != n.startswith("layer4.") for n, frozen in bns.items())


def test_freeze_patterns_and_unknown_module() -> None:
    model = _model()
    freeze(model, ["conv1.*", "bn1.*", "layer1.*"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))}
    with pytest.raises(ModelError, match="layer9"):
        freeze(model, "until:layer9")
    with pytest.raises(ModelError, match="nomatch"):
        freeze(model, ["nomatch.*"])


def test_frozen_batchnorm_ignores_train_and_keeps_statistics() -> None:
    model = _model()
    freeze(model, "backbone")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # a user (or a library) switching everything to train mode
    bn = model.bn1
    assert not bn.training
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) * 5 + 3)
    after = model.state_dict()
    for k in before:
        if not k.startswith("fc."):
            assert torch.equal(before[k], after[k]), k
    # The state dict keys are the plain torchvision ones: a frozen model loads into an unmodified one.
    plain = _model()
    plain.load_state_dict(after, strict=True)


@pytest.mark.parametrize(("policy", "kind"), [("backbone", "head"), ("until:layer3", "graph"), ("none", "none")])
def test_split_output_equals_full_model(policy: str, kind: str) -> None:
    model = _model()
    freeze(model, policy)
    model.eval()
    split = split_model(model)
    assert split.kind == kind
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(split.forward(x), model(x), atol=1e-5)
    suffix_params = {id(p) for p in split.suffix.parameters() if p.requires_grad}
    assert suffix_params == {id(p) for p in model.parameters() if p.requires_grad}
    if split.prefix is not None:
        # The prefix holds no trainable parameter: it never needs autograd, DDP or the optimizer.
        assert not any(p.requires_grad for p in split.prefix.parameters())


def test_split_until_layer3_prefix_ends_before_layer4() -> None:
    model = _model()
    freeze(model, "until:layer3")
    split = split_model(model)
    with torch.no_grad():
        feats = split.prefix(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 256, 4, 4)  # layer3 output
    assert any(n.startswith("layer4") for n, _ in split.suffix.named_parameters())


def test_split_vit_partial() -> None:
    model = _model("vit_b_16")
    freeze(model, "until:encoder.layers.encoder_layer_10")
    model.eval()
    split = split_model(model)
    assert split.kind == "graph"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(split.forward(x), model(x), atol=1e-4)


def test_local_weights_file_backbone_and_safetensors(tmp_path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = torchvision.models.resnet18()  # original 1000-class head, like a downloaded backbone
    torch.save(src.state_dict(), tmp_path / "backbone.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    for f in ("backbone.pth", "backbone.safetensors"):
        model = build_model(ModelConfig(weights=str(tmp_path / f)), 4)
        assert torch.equal(model.conv1.weight, src.conv1.weight)
        assert model.fc.out_features == 4
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match=r"wrong\.pt"):
        build_model(ModelConfig(weights=str(tmp_path / "wrong.pt")), 4)


def test_find_head_on_plain_sequential() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert find_head(m) == "2"
