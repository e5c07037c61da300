"""compile.target = auto decided by a measured trial: the decision follows the times, is cached, and is logged."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import tiny_config
from torch import nn

from fastft import compile as fcompile
from fastft.config import CompileConfig
from fastft.precision import Precision

FP32 = Precision(torch.float32, "cpu")
EAGER = CompileConfig(target="auto", backend="eager")  # dynamo traces, no code generation: cheap
KEY = {"model": "tiny", "shape": [4, 16]}


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5))


def _example() -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def _timer(eager_s: float, compile_s: float, compiled_s: float):
    """perf_counter as the trial reads it: (start, end) of the eager steps, of the compile, of the compiled steps."""
    ticks = iter([0.0, eager_s, 10.0, 10.0 + compile_s, 20.0, 20.0 + compiled_s])
    return lambda: next(ticks)


def _no_trial():
    raise AssertionError("a trial ran")


def _choose(module, tmp_path, *, timer, steps=1000, key=KEY, **kw) -> str:
    return fcompile.choose_target(
        EAGER,
        torch.device("cpu"),
        module,
        _example,
        precision=FP32,
        key=key,
        total_steps=steps,
        cache_file=tmp_path / "compile_auto.json",
        timer=timer,
        **kw,
    )


@pytest.mark.parametrize(
    ("eager_s", "compiled_s", "steps", "expected", "why"),
    [
        (0.3, 0.15, 1000, "head", "compiled is faster (compiled 50.0 ms/step vs eager 100.0 ms/step; compile 2.0 s)"),
        (0.15, 0.3, 1000, "none", "eager is faster (compiled 100.0 ms/step vs eager 50.0 ms/step)"),
        (0.3, 0.15, 30, "none", "30 steps win back 1.5 s of the 2.0 s compile"),
    ],
)
def test_decision_follows_measured_times(tmp_path, caplog, eager_s, compiled_s, steps, expected, why) -> None:
    with caplog.at_level(logging.INFO, logger="fastft"):
        got = _choose(_tiny(), tmp_path, timer=_timer(eager_s, 2.0, compiled_s), steps=steps, min_steps=1)
    assert got == expected
    assert f"compile.target=auto -> {expected}: " in caplog.text and why in caplog.text
    assert "measured now" in caplog.text


def test_cached_figures_are_reused_without_a_trial(tmp_path, caplog) -> None:
    assert _choose(_tiny(), tmp_path, timer=_timer(0.3, 2.0, 0.15)) == "head"
    cached = json.loads((tmp_path / "compile_auto.json").read_text())
    assert cached[json.dumps(KEY, sort_keys=True)] == pytest.approx(
        {"eager_ms": 100.0, "compiled_ms": 50.0, "compile_s": 2.0}
    )
    with caplog.at_level(logging.INFO, logger="fastft"):
        assert _choose(_tiny(), tmp_path, timer=_no_trial) == "head"
        # The run length still counts: the cached compile time is not won back in 30 steps.
        assert _choose(_tiny(), tmp_path, timer=_no_trial, steps=30) == "none"
    assert f"cached in {tmp_path / 'compile_auto.json'}" in caplog.text
    # Another key (a different batch shape) is measured again.
    other = {**KEY, "shape": [8, 16]}
    assert _choose(_tiny(), tmp_path, timer=_timer(0.15, 2.0, 0.3), key=other) == "none"
    assert len(json.loads((tmp_path / "compile_auto.json").read_text())) == 2


def test_short_run_or_explicit_target_runs_no_trial(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fastft"):
        assert _choose(_tiny(), tmp_path, timer=_no_trial, steps=10, min_steps=200) == "none"
    assert "a run of 10 steps (< 200): the cpu default" in caplog.text
    assert not (tmp_path / "compile_auto.json").exists()
    for target in ("none", "head", "all"):
        cfg = CompileConfig(target=target)
        assert (
            fcompile.choose_target(
                cfg, torch.device("cpu"), _tiny(), _example, precision=FP32, key=KEY, total_steps=10**6, cache_file=None
            )
            == target
        )


def test_trial_leaves_the_module_as_it_was() -> None:
    module = _tiny()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    rng = torch.get_rng_state()
    figures = fcompile.trial(module, _example(), cfg=EAGER, precision=FP32)
    assert set(figures) == {"eager_ms", "compiled_ms", "compile_s"} and min(figures.values()) > 0
    after = module.state_dict()
    assert after["1.num_batches_tracked"] == before["1.num_batches_tracked"]  # the trial ran 5+ train-mode forwards
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.parameters())
    assert not module.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_auto_run_trains_like_an_uncompiled_one(shapes4, tmp_path, monkeypatch, caplog) -> None:
    """End to end: the trial runs inside a linear probe on the frozen prefix's output, caches its figures under the
    run's key, and the run's result is that of compile.target = none (backend eager: same arithmetic)."""
    from fastft.train import finetune

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fcompile, "TRIAL_MIN_STEPS", 1)
    kw = {"model__freeze": "backbone", "optim__epochs": 1, "compile__backend": "eager"}
    with caplog.at_level(logging.INFO, logger="fastft"):
        auto = finetune(tiny_config(shapes4, tmp_path / "a", compile__target="auto", **kw))
    plain = finetune(tiny_config(shapes4, tmp_path / "n", compile__target="none", **kw))
    assert "compile.target=auto -> " in caplog.text and "ms/step vs eager" in caplog.text
    (key,) = json.loads((tmp_path / "cache" / "compile_auto.json").read_text())
    assert json.loads(key)["shape"] == [8, 3, 32, 32] and json.loads(key)["model"] == "torchvision:resnet18"
    assert auto.metrics["loss"] == plain.metrics["loss"]
    assert auto.metrics["confusion_matrix"] == plain.metrics["confusion_matrix"]
