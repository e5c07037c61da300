"""[augment]: per-sample policies are a function of (seed, epoch, sample) under rank dealing and resume; MixUp/CutMix
are a function of (seed, epoch, batch) with soft targets; the soft cross-entropy; one CLI run; the refusals."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

from fastft.augment import BatchMix
from fastft.config import AugmentConfig, DataConfig, load_config
from fastft.data.index import index_from_config
from fastft.data.torch_loader import TorchLoader
from fastft.data.transforms import TransformSpec
from fastft.errors import ConfigError
from fastft.losses import Loss
from fastft.sweep import Sweep

PIXEL = AugmentConfig(policy="randaugment", random_erase=0.5, color_jitter=0.4)
SPEC = TransformSpec(32, 36)


def _loader(samples, *, pixel_aug, batch_size=8, rank=0, world=1, workers=0) -> TorchLoader:
    return TorchLoader(
        samples, SPEC, train=True, batch_size=batch_size, workers=workers, seed=3, rank=rank, world=world,
        persistent_workers=False, pixel_aug=pixel_aug,
    )  # fmt: skip


def _by_sample(loader: TorchLoader, epoch: int, start_batch: int = 0) -> dict[int, torch.Tensor]:
    """The loader's output tensors of one epoch, keyed by sample index (the sampler's batches, in order)."""
    loader.set_epoch(epoch, start_batch)
    batches = list(loader.sampler)
    out = {}
    for batch, (images, _) in zip(batches, loader, strict=True):
        out.update({i: x for (i, _), x in zip(batch, images, strict=True)})
    return out


def test_augmented_pixels_follow_seed_epoch_and_sample_on_1_and_2_ranks_and_after_resume(shapes4) -> None:
    samples = index_from_config(DataConfig(root=str(shapes4))).train[::2]  # 24 images of 32 px, 4 classes
    one = _by_sample(_loader(samples, pixel_aug=PIXEL), epoch=1)
    assert len(one) == 24
    two: dict[int, torch.Tensor] = {}
    for rank in (0, 1):  # the same global batches dealt to 2 ranks of 4
        part = _by_sample(_loader(samples, pixel_aug=PIXEL, batch_size=4, rank=rank, world=2), epoch=1)
        assert not two.keys() & part.keys()
        two.update(part)
    assert two.keys() == one.keys() and all(torch.equal(two[i], one[i]) for i in one)
    resumed = _by_sample(_loader(samples, pixel_aug=PIXEL, workers=1), epoch=1, start_batch=1)  # resumed, in a worker
    assert len(resumed) == 16 and all(torch.equal(resumed[i], one[i]) for i in resumed)
    # The policy, jitter and erasing are applied (pixels differ from crop + flip alone on most samples) and are
    # drawn anew each epoch.
    plain = _by_sample(_loader(samples, pixel_aug=None), epoch=1)
    assert sum(not torch.equal(plain[i], one[i]) for i in one) >= 20
    other_epoch = _by_sample(_loader(samples, pixel_aug=PIXEL), epoch=2)
    assert sum(not torch.equal(other_epoch[i], one[i]) for i in one) >= 20


def _mix(**kw) -> BatchMix:
    return BatchMix(AugmentConfig(**kw), num_classes=4, seed=5)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 4


def test_mixup_cutmix_targets_sum_to_one_and_draws_follow_seed_epoch_and_batch() -> None:
    images, labels = _batch()
    mix = _mix(mixup_alpha=0.8, cutmix_alpha=1.0)
    kinds = set()
    for batch in range(12):
        x, t = mix(images.clone(), labels, epoch=1, batch=batch)
        assert t.shape == (8, 4) and torch.allclose(t.sum(dim=1), torch.ones(8), atol=1e-6)
        assert ((t > 0) & (t < 1)).any()  # mixed, not one-hot
        x2, t2 = _mix(mixup_alpha=0.8, cutmix_alpha=1.0)(images.clone(), labels, epoch=1, batch=batch)
        assert torch.equal(x, x2) and torch.equal(t, t2)  # a fresh mixer, same (seed, epoch, batch): same draws
        pasted = (x == images) | (x == images.roll(1, 0))  # CutMix pastes the neighbour's box; MixUp blends all
        kinds.add("cutmix" if pasted.all() else "mixup")
    assert kinds == {"mixup", "cutmix"}  # both alphas > 0: one of the two per batch
    x0, t0 = mix(images.clone(), labels, epoch=1, batch=0)
    for other in ({"epoch": 1, "batch": 1}, {"epoch": 2, "batch": 0}):
        x1, t1 = mix(images.clone(), labels, **other)
        assert not torch.equal(t0, t1) and not torch.equal(x0, x1)
    other_seed = BatchMix(AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0), num_classes=4, seed=6)
    assert not torch.equal(other_seed(images.clone(), labels, epoch=1, batch=0)[1], t0)


def test_mixing_leaves_the_global_random_stream_and_mix_prob_zero_keeps_the_batch() -> None:
    images, labels = _batch()
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    _mix(mixup_alpha=0.2)(images.clone(), labels, epoch=0, batch=0)
    assert torch.equal(torch.rand(3), expected)
    x, t = _mix(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.0)(images.clone(), labels, epoch=0, batch=0)
    assert torch.equal(x, images) and torch.equal(t, F.one_hot(labels, 4).float())


def test_soft_target_cross_entropy_is_the_hand_written_formula() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g)
    targets = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    hand = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert torch.allclose(Loss()(logits, targets), hand, atol=1e-6)
    # With smoothing and class weights, a one-hot row is exactly the class-index loss, and a mix of two rows is the
    # same mix of their losses.
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    loss = Loss(label_smoothing=0.1, weights=torch.tensor([0.5, 2.0, 1.0, 3.0]))
    assert torch.allclose(loss.per_sample(logits, F.one_hot(labels, 4).float()), loss.per_sample(logits, labels))
    lam, other = 0.3, labels.roll(1)
    soft = lam * F.one_hot(labels, 4).float() + (1 - lam) * F.one_hot(other, 4).float()
    expected = lam * loss.per_sample(logits, labels) + (1 - lam) * loss.per_sample(logits, other)
    assert torch.allclose(loss.per_sample(logits, soft), expected, atol=1e-6)
    # The head sweep repeats soft targets per head: each head's term is its own mean.
    bank = torch.randn(2, 6, 4, generator=g)
    swept = Sweep.loss(SimpleNamespace(heads=2), bank, targets, Loss())
    assert torch.allclose(swept, Loss()(bank[0], targets) + Loss()(bank[1], targets), atol=1e-6)


@pytest.mark.slow  # ~15 s: a subprocess imports torch, trains 3 steps, evaluates and writes the report
def test_a_cli_run_with_trivialaugment_mixup_and_random_erasing_trains(shapes4, tmp_path) -> None:
    out = tmp_path / "runs"
    p = run_cli(
        "train", f"--data.root={shapes4}", "--model.weights=none", "--data.image_size=32", "--data.batch_size=8",
        "--data.workers=0", "--precision.dtype=fp32", "--log.progress=false", "--run.device=cpu", "--optim.epochs=1",
        "--augment.policy=trivialaugment", "--augment.mixup_alpha=0.4", "--augment.random_erase=0.25",
        "--optim.max_steps=3", "--log.tensorboard=false", f"--run.out_dir={out}", "--run.name=aug",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = out / "aug"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in events if e.get("event") == "eval"]
    assert len(losses) == 1 and 0 < losses[0] < 100
    assert json.loads((run_dir / "metrics.json").read_text())["top1"] >= 0
    assert 'policy = "trivialaugment"' in (run_dir / "config.toml").read_text()


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["--features.cache=memory", "--augment.policy=randaugment"], ["augment.policy", "features.cache = memory"]),
        (["--features.cache=disk", "--augment.cutmix_alpha=1.0"], ["augment.cutmix_alpha", "features.cache"]),
        (["--data.loader=dali", "--augment.random_erase=0.25"], ["augment.random_erase", "data.loader = dali"]),
        (["--data.loader=synthetic", "--augment.policy=randaugment"], ["augment.policy", "data.loader = synthetic"]),
        (["--model.source=hf", "--augment.color_jitter=0.3"], ["augment.color_jitter", "model.source = hf"]),
        (["--optim.loss=focal", "--augment.mixup_alpha=0.2"], ["augment.mixup_alpha", "optim.loss = focal"]),
        (["--data.augment=false", "--augment.policy=autoaugment"], ["augment.policy", "data.augment = true"]),
        (["--augment.policy=augmix"], ["augment.policy", "augmix"]),
        (["--augment.random_erase=1.5"], ["augment.random_erase"]),
        (["--augment.mix_prob=-0.1"], ["augment.mix_prob"]),
    ],
)
def test_refusals_are_one_line_naming_the_option(overrides, needles) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_mixing_alone_is_allowed_with_dali_and_auto_picks_torch_for_pixel_options(caplog) -> None:
    from fastft.data import loaders
    from fastft.parallel.env import DistEnv

    load_config(None, ["--data.loader=dali", "--augment.mixup_alpha=0.2"])  # applied after any loader
    gpu = DistEnv(device=torch.device("cuda", 0))
    with caplog.at_level(logging.INFO, logger="fastft"):
        kind = loaders.resolve_loader(DataConfig(loader="auto"), gpu, pixel_aug=PIXEL)
    assert kind == "torch" and "augment.policy" in caplog.text


@pytest.mark.slow  # four 6-step runs in-process
def test_a_run_with_policy_erasing_and_mixing_resumes_mid_epoch_to_the_same_weights(shapes4, tmp_path, monkeypatch):
    """Interrupted after step 4 of 6 (last.pt mid-epoch), resumed: the weights equal the uninterrupted run's, so the
    per-sample pixels and each batch's MixUp/CutMix draws repeat."""
    from conftest import run_interrupted, tiny_config
    from safetensors.torch import load_file

    from fastft.train import finetune

    common = dict(
        optim__epochs=1, checkpoint__every_steps=2, data__loader="torch",
        augment__policy="trivialaugment", augment__random_erase=0.5, augment__mixup_alpha=0.4,
        augment__cutmix_alpha=1.0, augment__mix_prob=0.8,
    )  # fmt: skip
    full = finetune(tiny_config(shapes4, tmp_path, run__name="full", **common))
    plain = finetune(tiny_config(shapes4, tmp_path, run__name="plain", **{**common, "augment__mix_prob": 0.0}))
    run_interrupted(tiny_config(shapes4, tmp_path, run__name="cut", **common), monkeypatch, at_step=5)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (4, 0, 4)
    resumed = finetune(tiny_config(shapes4, tmp_path, run__name="cut", checkpoint__resume="auto", **common))
    assert resumed.steps == full.steps == 6
    wf, wr, wp = (load_file(r.paths["model_export"]) for r in (full, resumed, plain))
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], atol=1e-6, rtol=1e-5, msg=k)
    assert any(not torch.allclose(wp[k], wf[k]) for k in wf)  # the mixing changed the training
