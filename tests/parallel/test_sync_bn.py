"""parallel.sync_bn: which BatchNorm layers become SyncBatchNorm (the trainable part's only), and when.

torch's SyncBatchNorm synchronises only GPU tensors (its statistics kernels, torch.batch_norm_stats and friends, have
no CPU implementation, and its forward refuses CPU input under a process group), so on CPU these tests check the
conversion and the decision; the multi-rank numerics are checked by the gpu-marked test in test_ddp.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastft.config import FinetuneConfig, ModelConfig
from fastft.errors import ConfigError
from fastft.model import build_model, freeze, is_frozen_bn, split_model
from fastft.parallel.ddp import convert_sync_bn, resolve_sync_bn

CUDA = torch.device("cuda", 0)


def _partial_resnet18():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", weights="none"), 4)
    freeze(model, "until:layer3")
    return model, split_model(model)


def test_only_the_trainable_parts_batchnorm_is_converted_and_the_model_is_unchanged() -> None:
    model, split = _partial_resnet18()
    assert split.kind == "graph"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before_out, before_keys = model(x), list(model.state_dict())
    trainable_bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and not is_frozen_bn(m)]
    assert trainable_bn and all(n.startswith("layer4") for n in trainable_bn)  # layer3 and before are frozen

    n = convert_sync_bn(split.suffix, model)

    assert n == len(trainable_bn)
    synced = {name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)}
    assert synced == set(trainable_bn)
    # frozen BatchNorm (the prefix's, here layer3's last block too) keeps its frozen class
    assert all(is_frozen_bn(m) for name, m in model.named_modules() if name.startswith("layer3.1.bn"))
    # the suffix (an FX graph holding the same layers) uses the new layers, and they share the old tensors
    suffix_synced = [m for m in split.suffix.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert {id(m) for m in suffix_synced} == {id(model.get_submodule(n)) for n in trainable_bn}
    assert list(model.state_dict()) == before_keys  # checkpoints keep loading into plain torchvision models
    model.eval()
    torch.testing.assert_close(model(x), before_out, rtol=0, atol=0)
    # training the model moves the suffix's statistics: both views hold one tensor
    split.suffix.train()
    mean = model.get_submodule(trainable_bn[0]).running_mean.clone()
    split.suffix(split.prefix(x))  # one process, no process group: SyncBatchNorm normalises locally
    assert not torch.equal(model.get_submodule(trainable_bn[0]).running_mean, mean)


def test_a_linear_probe_has_nothing_to_convert() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", weights="none"), 4)
    freeze(model, "backbone")
    split = split_model(model)
    assert convert_sync_bn(split.suffix, model) == 0
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize(
    "setting,world,device,freeze_to,expect",
    [
        ("auto", 2, CUDA, "until:layer3", True),
        ("on", 2, CUDA, "until:layer3", True),
        ("off", 2, CUDA, "until:layer3", False),
        ("auto", 1, CUDA, "until:layer3", False),  # one process: nothing to synchronise
        ("auto", 2, CUDA, "backbone", False),  # no trainable BatchNorm
        ("auto", 2, torch.device("cpu"), "until:layer3", False),  # SyncBatchNorm cannot run on CPU
        ("on", 2, torch.device("cpu"), "until:layer3", False),
    ],
)
def test_when_sync_bn_is_on(setting, world, device, freeze_to, expect) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", weights="none"), 4)
    freeze(model, freeze_to)
    on, why = resolve_sync_bn(setting, split_model(model).suffix, world_size=world, device=device)
    assert on is expect
    if device.type == "cpu":
        assert "SyncBatchNorm needs a GPU" in why


def test_sync_bn_setting_is_validated() -> None:
    cfg = FinetuneConfig()
    cfg.parallel.sync_bn = "yes"
    with pytest.raises(ConfigError, match=r"parallel\.sync_bn"):
        cfg.validate()
