"""Layer-wise LR decay and gradual unfreezing (the split, cache, compile and wrapper are rebuilt mid-run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from conftest import tiny_config
from safetensors.torch import load_file

from fastft import checkpoint as ckpt_io
from fastft.config import ModelConfig, OptimConfig
from fastft.errors import ConfigError
from fastft.model import build_model
from fastft.optim import layer_depths, param_groups
from fastft.train import finetune


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_layer_decay_scales_each_stage() -> None:
    model = build_model(ModelConfig(weights="none"), 3)
    depths = layer_depths(model, "fc")
    assert depths["fc.weight"] == 0 and depths["layer4.0.conv1.weight"] == 1 and depths["layer1.1.bn2.bias"] == 4
    assert depths["conv1.weight"] == depths["bn1.weight"] == 5  # the stem is the deepest stage
    groups = param_groups(
        model, [n for n, _ in model.named_parameters()], OptimConfig(layer_decay=0.5, weight_decay=0.1), head="fc"
    )
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["fc.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["layer4.1.conv2.weight"])]["lr_scale"] == 0.5
    assert by_param[id(named["layer2.0.conv1.weight"])]["lr_scale"] == 0.5**3
    assert by_param[id(named["conv1.weight"])]["lr_scale"] == 0.5**5
    assert by_param[id(named["layer3.0.bn1.weight"])]["weight_decay"] == 0.0  # norms and biases: no decay
    assert by_param[id(named["layer3.0.conv1.weight"])]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_bad_unfreeze_entries() -> None:
    from fastft.config import config_from_dict

    for bad in (["1:layer4"], ["x:layer4"], ["2"], ["2:layer4:-1"]):
        with pytest.raises(ConfigError, match=r"optim.unfreeze\[0\]"):
            config_from_dict({"optim": {"unfreeze": bad}})


def _epoch_states(monkeypatch) -> list[dict]:
    """Capture the model state saved at the end of every epoch (last.pt: written, or linked to the same state just
    written as best.pt)."""
    states: list[dict] = []
    written: dict[str, dict] = {}
    real_save, real_link = ckpt_io.atomic_save, ckpt_io.atomic_link

    def spy(obj, path):
        written[Path(path).name] = {
            "model": {k: v.clone() for k, v in obj["model"].items()},
            "frozen": obj.get("frozen"),  # a probe checkpoint's fingerprint of what it does not hold
            "groups": [dict(g) for g in obj["optimizer"]["param_groups"]],
        }
        if Path(path).name == "last.pt":
            states.append(written["last.pt"])
        return real_save(obj, path)

    def link_spy(src, dst):
        if Path(dst).name == "last.pt":
            states.append(written[Path(src).name])
        return real_link(src, dst)

    monkeypatch.setattr(ckpt_io, "atomic_save", spy)
    monkeypatch.setattr(ckpt_io, "atomic_link", link_spy)
    return states


def test_unfreeze_at_epoch_2_trains_layer4_from_then_on(shapes4, backbone_file, tmp_path, monkeypatch) -> None:
    states = _epoch_states(monkeypatch)
    cfg = tiny_config(
        shapes4,
        tmp_path,
        model__weights=str(backbone_file),
        model__freeze="backbone",
        optim__epochs=3,
        optim__unfreeze=["2:layer4:0.1"],
    )
    finetune(cfg)
    init = torch.load(backbone_file, weights_only=True)
    assert len(states) == 3
    layer4 = [k for k in init if k.startswith("layer4.")]
    bn_buffers = [k for k in layer4 if "running_" in k]
    others = [k for k in init if not k.startswith(("layer4.", "fc."))]
    # Epoch 1: layer4 weights and BatchNorm statistics untouched. (Most of the model is frozen: a probe checkpoint,
    # which holds the head and the digest of the rest, and that digest is the weights file's.)
    assert not any(k in states[0]["model"] for k in layer4)
    frozen = [k for k in init if k not in states[0]["model"]]
    assert states[0]["frozen"]["blake2b"] == ckpt_io.frozen_digest(init, frozen)[0]
    # Epoch 2 on: every layer4 tensor moves, BN running stats included; nothing else in the backbone does.
    for k in layer4:
        if not k.endswith("num_batches_tracked"):
            assert not torch.equal(states[1]["model"][k], init[k]), k
    assert all(not torch.equal(states[1]["model"][k], states[2]["model"][k]) for k in bn_buffers)
    assert all(torch.equal(states[2]["model"][k], init[k]) for k in others)
    # The optimizer gained groups for layer4 with the LR factor, keeping the head's groups first.
    assert len(states[0]["groups"]) < len(states[1]["groups"])
    head_lr = states[1]["groups"][0]["lr"]
    new = states[1]["groups"][len(states[0]["groups"]) :]
    assert all(g["lr"] == pytest.approx(head_lr * 0.1) for g in new)


def test_unfreeze_drops_the_cache_and_matches_uncached(shapes4, backbone_file, tmp_path) -> None:
    common = {
        "model__weights": str(backbone_file),
        "model__freeze": "backbone",
        "optim__epochs": 3,
        "optim__unfreeze": ["2:layer4:0.1"],
        "data__augment": False,
    }
    plain = finetune(tiny_config(shapes4, tmp_path, run__name="plain", **common))
    cached = finetune(
        tiny_config(shapes4, tmp_path, run__name="cached", features__cache="memory", features__dtype="fp32", **common)
    )
    a, b = load_file(plain.paths["model_export"]), load_file(cached.paths["model_export"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=k)


class _Stop(Exception):
    pass


def test_resume_after_unfreeze_replays_it(shapes4, backbone_file, tmp_path, monkeypatch) -> None:
    from fastft.parallel.backend import LocalBackend

    common = {
        "model__weights": str(backbone_file),
        "model__freeze": "backbone",
        "optim__epochs": 3,
        "optim__unfreeze": ["2:layer4:0.1"],
        "checkpoint__every_steps": 1,
    }
    full = finetune(tiny_config(shapes4, tmp_path, run__name="full", **common))
    real, calls = LocalBackend.step, {"n": 0}

    def stop_in_epoch_2(self, boundary=True):
        calls["n"] += 1
        if calls["n"] == 9:  # 6 steps per epoch: step 9 is mid-epoch 2, after the unfreeze
            raise _Stop
        return real(self, boundary)

    monkeypatch.setattr(LocalBackend, "step", stop_in_epoch_2)
    with pytest.raises(_Stop):
        finetune(tiny_config(shapes4, tmp_path, run__name="cut", **common))
    monkeypatch.setattr(LocalBackend, "step", real)
    resumed = finetune(tiny_config(shapes4, tmp_path, run__name="cut", checkpoint__resume="auto", **common))
    a, b = load_file(full.paths["model_export"]), load_file(resumed.paths["model_export"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)
