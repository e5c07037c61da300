"""Class weights and focal loss (optim.class_weights, optim.loss): balanced weights equal scikit-learn's, the focal
term follows its formula, the batch mean composes exactly over ranks, and a run trains with what it was given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from fastft.errors import ConfigError
from fastft.losses import Loss, class_weights

CLASSES = ["a", "b", "c", "d", "e"]


def test_balanced_weights_equal_scikit_learns() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.random.default_rng(0).choice(5, size=203, p=[0.6, 0.2, 0.1, 0.07, 0.03])
    want = compute_class_weight("balanced", classes=np.arange(5), y=labels)
    got = class_weights("balanced", labels.tolist(), CLASSES)
    assert np.allclose(got.numpy(), want, rtol=1e-6)
    assert class_weights("none", labels.tolist(), CLASSES) is None
    assert class_weights([1, 2, 3, 4, 5], labels.tolist(), CLASSES).tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "spec,message",
    [
        ([1.0, 2.0], "optim.class_weights: 2 weights for 5 classes (a, b, c, d, e)"),
        ([1, 1, float("nan"), 1, 1], "optim.class_weights: weights must be finite, >= 0 and not all 0"),
        ("balanced", "optim.class_weights = balanced: class 'e' has no training samples"),
    ],
)
def test_bad_weights_are_one_line_errors(spec, message) -> None:
    with pytest.raises(ConfigError) as e:
        class_weights(spec, [0, 1, 2, 3, 0], CLASSES)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_focal_and_weighted_terms_follow_their_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(9, 5, generator=g) * 3, torch.randint(0, 5, (9,), generator=g)
    p = torch.softmax(logits.double(), dim=1)[torch.arange(9), labels]
    w = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.25])
    focal = Loss(kind="focal", gamma=2.0, weights=w).per_sample(logits, labels).double()
    assert torch.allclose(focal, -w[labels].double() * (1 - p) ** 2 * torch.log(p), rtol=1e-5)
    # gamma 0 is cross-entropy; weights scale each sample's term by its label's weight
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(Loss(kind="focal", gamma=0.0).per_sample(logits, labels), ce, rtol=1e-6)
    assert torch.allclose(Loss(weights=w).per_sample(logits, labels), ce * w[labels], rtol=1e-6)


def test_the_weighted_mean_of_a_global_batch_is_the_mean_of_its_shards() -> None:
    """Why the mean divides by the batch size: 2 ranks x 4 then compute one process x 8's loss (and gradient); torch's
    weighted mean (divided by the sum of the batch's weights) does not compose."""
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(8, 5, generator=g), torch.tensor([0, 0, 0, 1, 4, 4, 2, 3])
    w = torch.tensor([0.2, 1.0, 2.0, 3.0, 5.0])
    loss = Loss(weights=w)
    assert torch.allclose(loss(logits, labels), (loss(logits[:4], labels[:4]) + loss(logits[4:], labels[4:])) / 2)
    F = torch.nn.functional
    whole = F.cross_entropy(logits, labels, weight=w)
    halves = (F.cross_entropy(logits[:4], labels[:4], weight=w) + F.cross_entropy(logits[4:], labels[4:], weight=w)) / 2
    assert not torch.allclose(whole, halves)


def test_focal_loss_with_label_smoothing_is_refused_at_validation(shapes4, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"optim\.loss = focal does not take optim\.label_smoothing"):
        tiny_config(shapes4, tmp_path, optim__loss="focal", optim__label_smoothing=0.1)


def test_a_run_trains_with_its_class_weights(shapes4, tmp_path) -> None:
    """Equal weights of 1 are the unweighted loss, bit for bit; other weights change the update."""
    from safetensors.torch import load_file

    from fastft.train import finetune

    heads = {}
    for name, weights in (("none", "none"), ("ones", [1.0, 1.0, 1.0, 1.0]), ("skewed", [1.0, 4.0, 1.0, 1.0])):
        cfg = tiny_config(shapes4, tmp_path, optim__epochs=1, optim__class_weights=weights, run__name=name)
        finetune(cfg)
        heads[name] = load_file(tmp_path / name / "head.safetensors")
    assert all(torch.equal(heads["none"][k], heads["ones"][k]) for k in heads["none"])
    assert not torch.equal(heads["none"]["weight"], heads["skewed"]["weight"])
