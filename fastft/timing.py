"""Per-step time breakdown for benchmarks: data wait, frozen forward, trainable forward+backward, optimizer.

Off by default (it synchronises the device at every boundary, which costs overlap); `log.step_timing = true` or
the benchmark harness switches it on. With DDP the gradient all-reduce overlaps the backward pass, so it is
reported inside `trainable` (its share is estimated in the benchmark by comparing world sizes)."""

from __future__ import annotations

import time

import torch

SEGMENTS = ("data", "frozen", "trainable", "optimizer")


class StepTimer:
    def __init__(self, device: torch.device, *, enabled: bool) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(SEGMENTS, 0.0)
        self._t = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._t = time.perf_counter()

    def mark(self, segment: str) -> None:
        """Attribute the time since the last mark to `segment`."""
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.totals[segment] += now - self._t
            self._t = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def result(self) -> dict[str, float]:
        return dict(self.totals)
