"""Starting an epoch's loading early (workers spawn and decode while the model is built) changes nothing a run sees:
the same batches in the same order, the started epoch dropped when another is asked for, and no draw from the
global RNG (so when loading starts cannot change the head's initialisation or dropout)."""

from __future__ import annotations

import pytest
import torch
from conftest import child_pids, tiny_config

from fastft.data.torch_loader import TorchLoader
from fastft.data.transforms import TransformSpec

SPEC = TransformSpec(crop_size=16, resize_size=16)


def _samples(root):
    files = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    return [(f, i) for i, f in enumerate(files)]  # each file its own label: labels name the files


def _epoch(loader, epoch: int, start: int = 0, *, started: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if started:
        loader.start(epoch, start)
    loader.set_epoch(epoch, start)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_started_epoch_yields_the_batches_of_a_plain_one(shapes4, workers) -> None:
    samples = _samples(shapes4)
    plain = TorchLoader(samples, SPEC, train=True, batch_size=5, workers=workers, seed=3)
    early = TorchLoader(samples, SPEC, train=True, batch_size=5, workers=workers, seed=3)
    for epoch, start in ((0, 0), (1, 2), (2, 0)):
        want_x, want_y = _epoch(plain, epoch, start)
        got_x, got_y = _epoch(early, epoch, start, started=True)
        assert torch.equal(got_y, want_y), (epoch, start)
        assert torch.equal(got_x, want_x), (epoch, start)  # augmentation included: same pixels


def test_asking_for_another_epoch_drops_the_started_one(shapes4) -> None:
    samples = _samples(shapes4)
    ref = TorchLoader(samples, SPEC, train=True, batch_size=5, workers=1, seed=3)
    loader = TorchLoader(samples, SPEC, train=True, batch_size=5, workers=1, seed=3)
    loader.start(0)
    loader.set_epoch(1, 3)  # e.g. a different resume position than the one started
    _, got = zip(*loader)
    _, want = _epoch(ref, 1, 3)
    assert torch.equal(torch.cat(got), want)
    _, epoch0 = _epoch(ref, 0)
    assert not torch.equal(torch.cat(got)[: len(want)], epoch0[: len(want)])


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_never_draws_from_the_global_rng(shapes4, workers) -> None:
    loader = TorchLoader(_samples(shapes4), SPEC, train=True, batch_size=5, workers=workers, seed=3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    loader.start(0)
    for _ in loader:
        pass
    loader.set_epoch(1)
    for _ in loader:
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_the_head_does_not_depend_on_the_feature_cache_or_early_loading(shapes4, tmp_path) -> None:
    """Uncached runs start their loader before the model is built; cached runs start the cache's decode instead. Both
    must initialise the head from the same RNG state: their trained heads agree (fp32, eval transform)."""
    from fastft.train import finetune

    heads = []
    for cache in ("off", "memory"):
        cfg = tiny_config(
            shapes4,
            tmp_path / cache,
            data__workers=2,
            data__augment=False,
            features__cache=cache,
            features__dtype="fp32",
            features__dir=str(tmp_path / "cache"),
        )
        result = finetune(cfg)
        if cache == "memory":
            info = result.feature_cache
            assert info["train"] == info["val"] == "built" and info["images"] == 48 + 24 and info["wall_s"] > 0
        else:
            assert result.feature_cache == {}
        state = torch.load(result.paths["last"], weights_only=True)["model"]
        heads.append(state["fc.weight"])
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"model__weights": "/nonexistent/weights.pt"},  # fails building the model, after the loading started
        {"features__cache": "memory", "model__freeze": "none"},  # fails after the cache's decode started
    ],
    ids=["model-build", "feature-cache"],
)
def test_a_failed_run_leaves_no_data_workers_behind(shapes4, tmp_path, bad) -> None:
    """Embedded use keeps exceptions (notebooks, retries): the workers started early must not live on with them."""
    from fastft.errors import FastftError
    from fastft.train import finetune

    assert child_pids() == []
    with pytest.raises(FastftError) as caught:
        finetune(tiny_config(shapes4, tmp_path, data__workers=2, **bad))
    assert caught.value is not None  # the traceback (and the frames that held the loaders) is still alive here
    assert child_pids() == []


def test_a_finished_run_leaves_no_data_workers_behind(shapes4, tmp_path) -> None:
    from fastft.train import finetune

    result = finetune(tiny_config(shapes4, tmp_path, data__workers=2, optim__epochs=1))
    assert result.metrics["num_samples"] == 24
    assert child_pids() == []


def test_evaluate_that_fails_part_way_leaves_no_data_workers_behind(shapes4, tmp_path, monkeypatch) -> None:
    import fastft
    import fastft.api as api
    from fastft.train import finetune

    result = finetune(tiny_config(shapes4, tmp_path, optim__epochs=1))

    def fails_after_one_batch(model, loader, **kwargs):
        next(iter(loader))  # the workers are running now
        assert child_pids() != []
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(api, "run_evaluation", fails_after_one_batch)
    with pytest.raises(RuntimeError) as caught:
        fastft.evaluate(result.paths["last"], shapes4 / "val", workers=2, batch_size=4, device="cpu")
    assert caught.value is not None  # traceback still alive
    assert child_pids() == []
