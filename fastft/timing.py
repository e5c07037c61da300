"""Where a run's time goes: the per-step breakdown (StepTimer) and the set-up / teardown phases (Phases).

StepTimer: data wait, frozen forward, trainable forward+backward, optimizer per step.

Off by default (it synchronises the device at every boundary, which costs overlap); `log.step_timing = true` or
the benchmark harness switches it on. With DDP the gradient all-reduce overlaps the backward pass, so it is
reported inside `trainable` (its share is estimated in the benchmark by comparing world sizes)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

# When fastft runs from its command line: the time its package began to import (set by fastft.cli), so a run's
# set-up can show the imports before it.
PROCESS_T0: float | None = None

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


class Phases:
    """Seconds per named phase of a run's set-up or teardown, in the order first entered (a phase entered again adds
    to its total). Host wall time: a phase that queues device work is charged where the host waits for it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Charge the time since the last lap (or since this object was made, or `restart`) to `name`."""
        now = time.perf_counter()
        self.add(name, now - self._t)
        self._t = now

    def restart(self) -> None:
        self._t = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def result(self) -> dict[str, float]:
        """{phase: seconds, ..., "total": their sum}."""
        out = {k: round(v, 4) for k, v in self.totals.items()}
        out["total"] = round(sum(self.totals.values()), 4)
        return out

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.totals.items())
        return f"{sum(self.totals.values()):.1f} s ({parts})"
