"""The optimizer step alone on resnet50's 25.6 M parameters (CPU): torch's default (for-loop), foreach and fused, for
AdamW and SGD (momentum 0.9); mean of 5 steps after 2 warm-up steps, gradients fixed.

    python -m benchmarks.optim_step
"""

from __future__ import annotations

import time

import torch
import torchvision


def _seconds(params: list[torch.nn.Parameter], cls: type[torch.optim.Optimizer], **kw) -> float:
    opt = cls(params, lr=1e-3, **kw)
    for _ in range(2):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(5):
        opt.step()
    return (time.perf_counter() - t0) / 5


def main() -> None:
    torch.manual_seed(0)
    params = list(torchvision.models.resnet50().parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for cls, extra in [(torch.optim.AdamW, {}), (torch.optim.SGD, {"momentum": 0.9})]:
        for kw in [{"foreach": False}, {"foreach": True}, {"fused": True}]:
            print(cls.__name__, kw, f"{1000 * _seconds(params, cls, **extra, **kw):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
