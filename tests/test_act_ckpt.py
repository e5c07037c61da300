"""Activation checkpointing (fastft.act_ckpt): the same gradients and BatchNorm statistics as without it, in train
mode, after an unfreeze moved the cut, on a resnet and a ViT (with dropout, so the recomputation must replay the
random masks), batch 3; the checkpointed blocks really run again in the backward pass; also under torch.compile and
through the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastft import act_ckpt
from fastft.backbones.freeze import freeze, module_stages, name_stages
from fastft.backbones.split import TraceOptions, split_model
from fastft.unfreeze import unfreeze_module


def _resnet(layers: tuple[int, ...] = (1, 1, 2, 2)) -> tuple[nn.Module, str]:
    """A narrow resnet (bottleneck width 4 per 64 output planes: cheap to build), trainable BatchNorm in its blocks."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, list(layers), width_per_group=4, num_classes=3), "fc"


def _vit() -> tuple[nn.Module, str]:
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.3, num_classes=3
    )
    return vit, "heads.head"


# (model, frozen until, unfrozen after the first split, a block that the unfreeze makes train, a leaf inside it)
CASES = {
    "resnet": (_resnet, "until:layer3", "layer3", "layer3.1", "conv2"),
    "vit": (
        _vit,
        "until:encoder.layers.encoder_layer_2",
        "encoder.layers.encoder_layer_2",
        "encoder.layers.encoder_layer_2",
        "mlp.0",
    ),
}


def _split(model: nn.Module, head: str, on: bool):
    return split_model(model, head=head, trace=TraceOptions(leaf_names=act_ckpt.apply(model, on=on)))


def _step(case: str, on: bool) -> tuple[dict, dict, int, object]:
    make, until, unfreeze, block, leaf = CASES[case]
    torch.manual_seed(0)
    model, head = make()
    freeze(model, until, head=head, stages=name_stages(model, module_stages(model, head), head))
    _split(model, head, on)
    unfreeze_module(model, unfreeze)  # the cut moves: the split and the checkpointed set are made again
    split = _split(model, head, on)
    model.train()
    calls = []
    model.get_submodule(f"{block}.{leaf}").register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)
    split.forward(torch.randn(3, 3, 32, 32)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, dict(model.named_buffers()), len(calls), split


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_recomputes_with_the_same_gradients(case: str) -> None:
    grads, buffers, calls, _ = _step(case, False)
    grads_ck, buffers_ck, calls_ck, split_ck = _step(case, True)
    block = CASES[case][3]
    assert split_ck.kind == "graph" and block in {n.target for n in split_ck.suffix.graph.nodes}  # called whole
    assert (calls, calls_ck) == (1, 2)  # the block runs again in the backward pass
    assert grads.keys() == grads_ck.keys() and len(grads) > 4
    for n in grads:  # the same kernels on the same inputs: bit-identical on CPU
        torch.testing.assert_close(grads_ck[n], grads[n], rtol=0, atol=0, msg=n)
    for n in buffers:  # BatchNorm statistics updated once per step, as without checkpointing
        torch.testing.assert_close(buffers_ck[n], buffers[n], rtol=0, atol=0, msg=n)


def test_only_blocks_that_train_are_checkpointed_and_the_choice_is_undone() -> None:
    model, head = _resnet()
    freeze(model, "until:layer3", head=head, stages=name_stages(model, module_stages(model, head), head))
    with torch.no_grad():
        model.layer3[1].conv2.weight.requires_grad_(True)  # a partly trainable block stays inlined (its frozen part)
    assert act_ckpt.apply(model, on=True) == {"layer4.0", "layer4.1"}
    assert "forward" in model.layer4[0].__dict__ and "forward" not in model.layer3[1].__dict__
    assert act_ckpt.apply(model, on=False) == frozenset()
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.slow
def test_checkpointed_suffix_under_torch_compile() -> None:
    """aot_eager (no C++ toolchain needed): the compiled checkpointed suffix gives the eager gradients, within float
    reordering, and updates BatchNorm statistics once."""
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, head = _resnet((1, 1, 1, 1))
        freeze(model, "until:layer3", head=head, stages=name_stages(model, module_stages(model, head), head))
        split = _split(model, head, True)
        model.train()
        suffix = torch.compile(split.suffix, backend="aot_eager") if compiled else split.suffix
        torch.manual_seed(1)
        with torch.no_grad():
            feats = split.prefix(torch.randn(3, 3, 32, 32))
        suffix(feats).square().mean().backward()
        out.append((model.layer4[0].conv1.weight.grad.clone(), model.layer4[0].bn1.num_batches_tracked.item()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    assert out[0][1] == out[1][1] == 1


def test_trainer_run_checkpoints_the_trainable_blocks(shapes4, tmp_path, caplog) -> None:
    """Through fastft.finetune (resnet18, 32 px, layer4 and head train, 2 steps, the old key name): the trainer's
    split checkpoints layer4's two blocks, and their BatchNorm statistics count each step once."""
    from conftest import tiny_config

    from fastft.train import finetune

    cfg = tiny_config(shapes4, tmp_path, model__freeze="until:layer3", model__grad_checkpointing=True)
    cfg.optim.max_steps, cfg.optim.epochs, cfg.log.tensorboard = 2, 1, False
    with caplog.at_level("INFO", logger="fastft"):
        result = finetune(cfg)
    state = torch.load(result.paths["last"], weights_only=True)["model"]
    assert "activation checkpointing of 2 trainable blocks" in caplog.text
    assert [state[f"layer4.{i}.bn2.num_batches_tracked"].item() for i in (0, 1)] == [2, 2]


@pytest.mark.slow
def test_trainer_run_with_activation_checkpointing_matches_the_plain_run(shapes4, tmp_path) -> None:
    """The same run with and without activation checkpointing saves the same weights and BatchNorm statistics."""
    from conftest import tiny_config

    from fastft.train import finetune

    states = []
    for on in (False, True):
        cfg = tiny_config(shapes4, tmp_path / str(on), model__freeze="until:layer3", model__activation_checkpointing=on)
        cfg.optim.max_steps, cfg.optim.epochs, cfg.log.tensorboard = 2, 1, False
        states.append(torch.load(finetune(cfg).paths["last"], weights_only=True)["model"])
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-5, atol=1e-6, msg=k)


def _two_rank_run(shapes4, out, *, backend: str, on: bool) -> dict[str, torch.Tensor]:
    """2 ranks on CPU (gloo), resnet18 with layer4 and head training, 2 steps; the saved model state."""
    from conftest import run_torchrun

    name = f"{backend}-{on}"
    p = run_torchrun(
        2,
        "train",
        f"--data.root={shapes4}",
        "--model.weights=none",
        "--model.freeze=until:layer3",
        f"--model.activation_checkpointing={str(on).lower()}",
        f"--parallel.backend={backend}",
        "--data.image_size=32",
        "--data.batch_size=4",
        "--data.workers=0",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--optim.max_steps=2",
        "--optim.epochs=1",
        "--log.progress=false",
        "--run.device=cpu",
        f"--run.out_dir={out}",
        f"--run.name={name}",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out / name / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def plain_two_ranks(shapes4, module_tmp) -> dict[str, torch.Tensor]:
    return _two_rank_run(shapes4, module_tmp("act-ckpt-plain"), backend="ddp", on=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_two_ranks_with_activation_checkpointing_match_the_plain_run(plain_two_ranks, shapes4, tmp_path, backend):
    """The same saved weights and BatchNorm statistics with activation checkpointing as the plain DDP run. DeepSpeed
    in fp32 equals DDP to 1e-5 (only the order of the gradient reduction differs; see test_backend_matrix.py); under
    DDP the same reduction runs, so the bound there is fp32 rounding."""
    state = _two_rank_run(shapes4, tmp_path, backend=backend, on=True)
    atol = 1e-6 if backend == "ddp" else 1e-5
    for k in plain_two_ranks:
        torch.testing.assert_close(state[k], plain_two_ranks[k], rtol=1e-5, atol=atol, msg=k)
