"""fp16 loss scaling and the optimizer's step kernel: a step the GradScaler skips (overflowed gradients) leaves the
weights and the optimizer state exactly as they were, for SGD and AdamW as fastft builds them, and the next step
matches torch's reference for-loop optimizer given the same skip. (torch's fused SGD allocates uninitialised momentum
buffers before its kernel skips the step: fastft must not build it under loss scaling.)"""

from __future__ import annotations

import pytest
import torch

from fastft.config import OptimConfig
from fastft.optim import build_optimizer


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(33, 7, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _steps(opt: torch.optim.Optimizer, params, scaler: torch.amp.GradScaler) -> list[dict]:
    """Step 1 overflows (skipped by the scaler), step 2 is finite: the weights and the state after each."""
    x = torch.linspace(-1, 1, 33 * 5).reshape(5, 33)
    after = []
    for bad in (True, False):
        opt.zero_grad(set_to_none=True)
        loss = ((x @ params[0] + params[1]) ** 2).mean()
        if bad:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        after.append(
            {
                "weights": [p.detach().clone() for p in params],
                "state": {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)},
            }
        )
    return after


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_skipped_fp16_step_changes_nothing_and_the_next_step_matches_the_reference(name) -> None:
    cfg = OptimConfig(name=name, lr=0.1, momentum=0.9)
    params = _params()
    start = [p.detach().clone() for p in params]
    groups = [{"params": params, "lr_scale": 1.0, "weight_decay": 0.0}]
    opt = build_optimizer(groups, cfg, device=torch.device("cpu"), scaled=True)
    got = _steps(opt, params, torch.amp.GradScaler("cpu", init_scale=2.0**16))

    ref_params = _params()
    if name == "sgd":
        ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, foreach=False)
    else:
        ref = torch.optim.AdamW(ref_params, lr=0.1, betas=tuple(cfg.betas), weight_decay=0.0, foreach=False)
    want = _steps(ref, ref_params, torch.amp.GradScaler("cpu", init_scale=2.0**16))

    skipped = got[0]
    assert all(torch.equal(a, b) for a, b in zip(skipped["weights"], start, strict=True))
    if name == "sgd":  # the reference creates no momentum buffer on a skipped step; nor may fastft's optimizer
        assert all("momentum_buffer" not in s for s in skipped["state"].values()), skipped["state"]
    for a, b in zip(got[1]["weights"], want[1]["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for i, s in want[1]["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(got[1]["state"][i][k].float(), v.float(), rtol=1e-6, atol=1e-7)
