"""BatchNorm folding for the feature-cache build (fastft.fold_bn): the folded prefix computes what the prefix computes,
across model families, on odd sizes, with BatchNorm statistics far from the identity; it folds exactly the plain
conv -> BatchNorm pairs and leaves the prefix itself untouched."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fastft.backbones.freeze import freeze, freeze_bn, is_bn
from fastft.backbones.split import split_model
from fastft.fold_bn import fold_bn


def _scramble_bn(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from mean 0 / var 1 / scale 1 / shift 0, so that a fold that
    dropped or misapplied any of them would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if is_bn(m):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.2)
                m.weight.copy_(torch.rand(n, generator=g) * 2 - 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


def _frozen_headless(name: str) -> nn.Module:
    model = torchvision.models.get_model(name, weights=None)
    _scramble_bn(model)
    for m in model.modules():
        if is_bn(m):
            freeze_bn(m)  # fastft's frozen BatchNorm class: the fold must see through it
    return model


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 20), ("mobilenet_v3_small", 34), ("efficientnet_b0", 49), ("convnext_tiny", 0)],
)
def test_the_folded_prefix_computes_what_the_prefix_computes(name, expected):
    model = _frozen_headless(name)
    model.eval()
    n_bn = sum(1 for m in model.modules() if is_bn(m))
    assert n_bn == expected  # every BatchNorm in these families follows a plain conv (convnext has LayerNorm only)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 75, 61, generator=torch.Generator().manual_seed(1))  # odd batch and sides
    with torch.inference_mode():
        want = model(x)
    folded, n = fold_bn(model)
    assert n == expected
    if expected == 0:
        assert folded is model  # nothing to fold: the prefix itself, no copy
    else:
        assert not any(is_bn(m) for m in folded.modules())
    with torch.inference_mode():
        got = folded(x)
        again = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert torch.equal(again, want)  # the prefix runs as before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(1 for m in model.modules() if is_bn(m)) == n_bn


def test_a_graph_cut_prefix_of_a_partial_fine_tune_is_folded_in_its_eval_mode():
    model = _frozen_headless("resnet18")
    freeze(model, "until:layer3", head="fc")
    split = split_model(model, head="fc")
    assert split.kind == "graph"
    model.train()  # the loop's mode: the prefix must still compute its eval function, folded
    x = torch.randn(5, 3, 64, 48)
    with torch.inference_mode():
        want = split.prefix(x)
    folded, n = fold_bn(split.prefix)
    assert n == 1 + 4 + 5 + 5  # the frozen stem, layer1 (2 blocks x 2), layer2 and layer3 (each 4 + a downsample)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_batchnorm_in_training_mode_a_shared_conv_output_and_timm_norm_act_are_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.conv2(self.bn(y))
            return self.bn2(z) + y  # conv's output is read twice: folding bn into it would change `+ y`

    m = Shared()
    _scramble_bn(m)
    m.eval()
    x = torch.randn(2, 3, 9, 9)
    folded, n = fold_bn(m)
    assert n == 1  # bn2 into conv2 only
    with torch.no_grad():
        torch.testing.assert_close(folded(x), m(x), rtol=1e-5, atol=1e-5)
    m.train()  # batch statistics: not an affine map, nothing folds
    assert fold_bn(m) == (m, 0)

    timm = pytest.importorskip("timm")
    eff = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0).eval()
    _scramble_bn(eff)
    folded, n = fold_bn(eff)
    # timm's BatchNormAct2d applies its activation too: a plain fold would drop it, so none is folded
    assert n == 0 and folded is eff


def test_training_through_the_folded_prefix_matches_the_unfolded_one_across_an_unfreeze(shapes4, tmp_path, monkeypatch):
    """The loop runs the frozen prefix folded, in every step and evaluation, and folds again when an unfreeze moves
    the cut (a stale fold would run layer3 with its old weights, and hand layer4 the wrong tensor). Against the same
    run with folding off: the same trained model, to fp32 rounding. (A small learning rate: with these scrambled
    statistics, lr 0.01 makes training chaotic enough to amplify rounding alone to 1e-2 in three epochs. Even at lr
    0.001 some initial weights amplify it: on 2 of 6 seeds, nudging the unfolded prefix's output by random noise of
    1e-6 of its mean magnitude moved the BatchNorm running statistics by 1e-3 to 2.5e-3, as far as folding did. Seed
    0's model, measured so: 6e-6 apart folded and unfolded, well inside the tolerance.)"""
    from conftest import tiny_config
    from safetensors.torch import load_file

    import fastft.inputs
    from fastft.train import finetune

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    _scramble_bn(net, seed=3)
    weights = tmp_path / "r18.pth"
    torch.save(net.state_dict(), weights)
    common = {
        "model__weights": str(weights),
        "model__freeze": "until:layer3",
        "optim__epochs": 3,
        "optim__lr": 0.001,
        "optim__unfreeze": ["2:layer3:0.1"],
        "data__augment": False,
    }
    real, folds = fastft.inputs.fold_bn, []

    def counted(prefix):
        out = real(prefix)
        folds.append(out[1])
        return out

    monkeypatch.setattr(fastft.inputs, "fold_bn", counted)
    folded = finetune(tiny_config(shapes4, tmp_path, run__name="folded", **common))
    assert folds == [15, 10]  # stem, layer1, layer2 and layer3; after the unfreeze layer3's 5 are no longer frozen
    plain = finetune(tiny_config(shapes4, tmp_path, run__name="plain", model__fold_bn=False, **common))
    assert folds == [15, 10]  # the switch: fold_bn was not called again
    a, b = load_file(plain.paths["model_export"]), load_file(folded.paths["model_export"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)
    assert folded.metrics["confusion_matrix"] == plain.metrics["confusion_matrix"]


def test_a_disk_cache_of_folded_features_is_not_reused_unfolded(shapes4, tmp_path, caplog) -> None:
    """Features computed with folding off differ from folded ones by rounding: the disk cache keeps them apart (a
    cache built folded is not reused with model.fold_bn = false, and the other way), and reuses each of its own."""
    import logging

    from conftest import tiny_config

    from fastft.train import finetune

    caplog.set_level(logging.INFO, logger="fastft")
    common = {"features__cache": "disk", "features__dir": str(tmp_path / "cache"), "optim__epochs": 1}
    seen = []
    for i, fold in enumerate([True, False, False, True]):
        caplog.clear()
        finetune(tiny_config(shapes4, tmp_path, run__name=f"r{i}", model__fold_bn=fold, **common))
        seen.append(
            "built"
            if "train built, val built" in caplog.text
            else "disk"
            if "train disk, val disk" in caplog.text
            else caplog.text
        )
        assert ("BatchNorm layers folded" in caplog.text) == (fold and i == 0)  # nothing folds for a reused table
    assert seen == ["built", "built", "disk", "disk"]
