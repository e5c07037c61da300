"""Numerical guard: a NaN/inf loss stops the run with a line naming the epoch and step and keeps the last good
checkpoint; fp16 steps skipped by the loss scaler (overflow) are counted and reported."""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn.functional as F
from _reliability import FAST, cli, error_line, events, finite_state, mentions, one_thread
from conftest import tiny_config

import fastft.losses
import fastft.train
import fastft.trainer
from fastft.parallel.backend import LocalBackend


def _poison_loss(monkeypatch, at_call: int, value: float) -> None:
    """The at_call-th training loss becomes `value` (fastft.losses uses F only for cross_entropy)."""
    calls = {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = F.cross_entropy(*args, **kwargs)
        return loss * value if calls["n"] == at_call else loss

    monkeypatch.setattr(fastft.losses, "F", types.SimpleNamespace(cross_entropy=cross_entropy))


def _train(shapes4, out, *extra: str) -> tuple[int, str]:
    # 48 images / batch 8 = 6 steps per epoch; last.pt after every step
    return cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=8",
        "--optim.epochs=2",
        "--checkpoint.every_steps=1",
        f"--run.out_dir={out}",
        "--run.name=r",
        *extra,
    )


@pytest.mark.parametrize("value,step,epoch", [(float("nan"), 8, 2), (float("inf"), 2, 1)])
def test_a_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
    shapes4, tmp_path, monkeypatch, value, step, epoch
) -> None:
    _poison_loss(monkeypatch, step, value)
    rc, err = _train(shapes4, tmp_path, "--model.freeze=until:layer3")
    run = tmp_path / "r"
    assert rc == 2
    # names the value, the epoch and step (1-based, as the log prints them) and where the good checkpoint is
    assert mentions(error_line(err), f"loss is {value}", f"epoch {epoch}, step {step}", str(run))
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["step"] == step - 1 and (last["epoch"], last["batch"]) == divmod(step - 1, 6)
    assert finite_state(last["model"]) and finite_state(last["optimizer"]["state"][0])
    assert [e["step"] for e in events(run) if e["event"] == "step"][-1] == step - 1
    assert not (run / "model.safetensors").exists() and "end" not in [e["event"] for e in events(run)]


def test_non_finite_gradients_never_reach_the_saved_checkpoint(shapes4, tmp_path, monkeypatch) -> None:
    calls = {"n": 0}

    def cross_entropy(logits, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # finite loss, infinite gradient: what an overflow inside backward produces
            logits.register_hook(lambda g: g * float("inf"))
        return F.cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(fastft.losses, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    rc, err = _train(shapes4, tmp_path, "--model.freeze=backbone")
    assert rc == 2 and "epoch 1" in error_line(err)
    assert finite_state(torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=True)["model"])


# --------------------------------------------------------------------------------------------------------------------
# fp16 loss scaling


def test_the_backend_counts_steps_the_scaler_skips() -> None:
    """CPU fp16 autocast + GradScaler("cpu") (torch >= 2.4): an overflowing step is skipped, counted, and leaves the
    weights unchanged; the count survives the backend's state_dict."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))

    def one_step(backend: LocalBackend) -> bool:
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(x)
        backend.backward(F.cross_entropy(logits.float(), y))
        return backend.step(True)

    huge = LocalBackend(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**40))
    huge.wrap(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    assert [one_step(huge) for _ in range(3)] == [False, False, False]
    assert huge.skipped_steps == 3 and huge.scaler.get_scale() == 2.0**37
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    restored = LocalBackend(scaler=torch.amp.GradScaler("cpu"))
    restored.load_state_dict(huge.state_dict())  # what a resume does
    assert restored.skipped_steps == 3 and restored.scaler.get_scale() == 2.0**37

    sane = LocalBackend(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    sane.wrap(model, opt)
    assert one_step(sane) is True and sane.skipped_steps == 0
    assert not torch.equal(before[0], model.weight)


class _HugeScaler(torch.amp.GradScaler):
    def __init__(self, device: str = "cuda", init_scale: float = 2.0**40, **kwargs) -> None:
        super().__init__(device, init_scale=2.0**40, **kwargs)


def test_an_fp16_run_reports_the_steps_the_scaler_skipped(shapes4, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.amp, "GradScaler", _HugeScaler)  # every step overflows in fp16 at 2**40..2**35
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("fastft").addHandler(handler)
    try:
        cfg = tiny_config(
            shapes4,
            tmp_path,
            precision__dtype="fp16",
            model__freeze="backbone",
            optim__epochs=1,
            log__tensorboard=False,
        )
        with one_thread():
            result = fastft.train.finetune(cfg)
    finally:
        logging.getLogger("fastft").removeHandler(handler)
    assert result.steps == 6 and result.skipped_steps == 6
    assert events(result.run_dir)[-1]["skipped_steps"] == 6
    assert any("skipped" in r and "6" in r for r in records), records


def test_on_the_gpu_cadence_a_bad_last_step_of_an_epoch_never_reaches_a_checkpoint(shapes4, tmp_path, monkeypatch):
    """On a GPU the loop checks loss and gradients only at the log cadence (each check is a host sync); every save
    still checks. Here the CPU run takes the GPU path: the last step of epoch 2 (step 12, off the log cadence) gets an
    infinite gradient, and neither last.pt nor best.pt may take it: both stay at epoch 1's finite state."""
    monkeypatch.setattr(fastft.trainer, "_eager_checks", lambda device: False)
    calls = {"n": 0}

    def cross_entropy(logits, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 12:
            logits.register_hook(lambda g: g * float("inf"))
        return F.cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(fastft.losses, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    rc, err = cli(
        "train",
        f"--data.root={shapes4}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=8",
        "--optim.epochs=2",
        "--model.freeze=backbone",
        "--log.every_steps=100",
        "--checkpoint.best_mode=min",
        "--checkpoint.best_metric=top1",  # min: a broken epoch 2 would count as the best one
        f"--run.out_dir={tmp_path}",
        "--run.name=r",
    )
    run = tmp_path / "r"
    assert rc == 2
    # Clipping is off: no gradient norm is computed; the bad gradient made the weights non-finite, refused at the save
    assert mentions(error_line(err), "a weight is not finite", "epoch 2, step 12", str(run))
    for name in ("last.pt", "best.pt"):
        saved = torch.load(run / name, map_location="cpu", weights_only=True)
        assert (saved["epoch"], saved["step"]) == (1, 6), name
        assert finite_state(saved["model"]), name
    assert calls["n"] == 12  # the guard did not stop the run early: the bad step was the last one


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_bad_element_among_mixed_tensors(bad, dtype) -> None:
    """The save-time check: one bad element anywhere (any floating dtype, beside tensors of other dtypes, an empty
    one and integer buffers) makes the state non-finite; the largest finite values of each dtype do not."""
    from fastft.parallel.backend import all_finite

    state = {
        "a": torch.randn(7, 5),
        "b": torch.randn(300, dtype=torch.bfloat16),
        "c": torch.randn(3, 3, dtype=torch.float16),
        "empty": torch.empty(0),
        "steps": torch.tensor(3),
        "big32": torch.full((4,), torch.finfo(torch.float32).max),
        "big16": torch.full((4,), torch.finfo(torch.float16).max, dtype=torch.float16),
    }
    assert all_finite(state)
    poisoned = torch.randn(11, 13).to(dtype)
    poisoned[5, 7] = bad
    assert not all_finite({**state, "poisoned": poisoned})
    assert all_finite({**state, "fine": poisoned.nan_to_num(0.0, 0.0, 0.0)})


@pytest.mark.parametrize("where", [0, 1_234_567, (1 << 22) - 1])
def test_all_finite_on_large_tensors_sees_one_bad_element_wherever_the_partial_sums_split(where) -> None:
    """The CPU check sums each tensor (in parallel partial sums): an inf beside a -inf (whose sum is NaN), or a NaN,
    at either end or in the middle of a 4M-element tensor is found; huge finite values that overflow the sum are
    not refused."""
    from fastft.parallel.backend import all_finite

    t = torch.randn(1 << 22)
    assert all_finite({"t": t})
    for bad in ([float("inf"), float("-inf")], [float("nan")]):
        u = t.clone()
        u[where] = bad[0]
        if len(bad) > 1:
            u[(where + 1) % u.numel()] = bad[1]
        assert not all_finite({"u": u, "ok": t})
    huge = torch.full((1 << 22,), 1e38)
    huge[::2] = -1e38
    huge[: 1 << 20] = 3e38  # the sum overflows; every element is finite
    assert all_finite({"huge": huge})
