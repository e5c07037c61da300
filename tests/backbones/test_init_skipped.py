"""A torchvision model built over weights skips the random initialisation they overwrite: every backbone tensor is
the file's, the new head is initialised as torch initialises a Linear, a file that does not cover the model is still
refused, torch.nn.init comes back whole, and a model built without weights is initialised as before."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from fastft.backbones import build_backbone
from fastft.backbones.weights import init_skipped
from fastft.config import ModelConfig
from fastft.errors import CheckpointError

INIT = {n: getattr(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")}


def _weights_file(tmp_path, name: str, *, drop: str | None = None):
    torch.manual_seed(1)
    state = torchvision.models.get_model(name, weights=None).state_dict()
    if drop:
        state.pop(drop)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, state


@pytest.mark.parametrize(("name", "head"), [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_a_model_over_a_weights_file_holds_the_file_and_a_freshly_initialised_head(tmp_path, name, head) -> None:
    path, state = _weights_file(tmp_path, name)
    torch.manual_seed(2)
    bb = build_backbone(ModelConfig(name=name, weights=str(path)), 5)
    assert bb.model.training  # as the training loop gets it
    got = bb.model.state_dict()
    for k, v in state.items():
        if not k.startswith(head + "."):
            assert torch.equal(got[k], v), k
    w, b = got[f"{head}.weight"], got[f"{head}.bias"]
    # torch's Linear: kaiming_uniform(a=sqrt(5)) weights and a uniform bias, both within +-1/sqrt(fan_in)
    bound = 1 / math.sqrt(w.shape[1])
    assert w.shape[0] == 5 and torch.isfinite(w).all() and torch.isfinite(b).all()
    assert w.abs().max() <= bound and b.abs().max() <= bound
    assert w.std() > bound / 4  # uniform(-bound, bound) has std bound/sqrt(3): initialised, not zeros or left empty
    assert all(getattr(torch.nn.init, n) is f for n, f in INIT.items())


def test_a_file_that_does_not_cover_the_model_is_refused_and_init_comes_back(tmp_path) -> None:
    path, _ = _weights_file(tmp_path, "resnet18", drop="layer2.0.bn1.running_var")
    with pytest.raises(CheckpointError, match=r"layer2\.0\.bn1\.running_var"):
        build_backbone(ModelConfig(name="resnet18", weights=str(path)), 5)
    assert all(getattr(torch.nn.init, n) is f for n, f in INIT.items())


def test_the_initialisers_come_back_after_an_error_inside() -> None:
    with pytest.raises(RuntimeError, match="boom"), init_skipped():
        assert torch.nn.init.kaiming_uniform_ is not INIT["kaiming_uniform_"]
        raise RuntimeError("boom")
    assert all(getattr(torch.nn.init, n) is f for n, f in INIT.items())


def test_without_weights_the_model_is_initialised_as_torchvision_does() -> None:
    torch.manual_seed(3)
    bb = build_backbone(ModelConfig(name="resnet18", weights="none"), 5)
    torch.manual_seed(3)
    ref = torchvision.models.get_model("resnet18", weights=None)
    got = bb.model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k


def test_other_threads_initialise_as_usual_meanwhile() -> None:
    """An application embedding fastft may build its own modules on another thread while fastft builds a model."""
    import threading

    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        seen["ones"] = torch.nn.init.ones_(torch.empty(5))
        seen["linear"] = torch.nn.Linear(64, 32).weight.detach()

    with init_skipped():
        assert torch.equal(torch.nn.init.ones_(torch.zeros(3)), torch.zeros(3))  # this thread: skipped
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert torch.equal(seen["ones"], torch.ones(5))
    w, bound = seen["linear"], 1 / math.sqrt(64)
    assert w.abs().max() <= bound and w.std() > bound / 4
