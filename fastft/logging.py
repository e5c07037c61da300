"""Rank-0 run logging: console lines, a JSON-lines event log and TensorBoard (imported only when enabled)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fastft.config import LogConfig

log = logging.getLogger("fastft")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (not the stream of the first call: a caller that
    swaps stderr, as an embedding application or a test capture does, would leave it writing to a closed file)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console(rank: int = 0) -> None:
    """Console logging for the CLI: rank 0 prints info, other ranks only warnings (tagged with their rank)."""
    if log.handlers:
        return
    h = _StderrHandler()
    h.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class RunLogger:
    """Writes events.jsonl and TensorBoard scalars; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path | None, cfg: LogConfig, *, enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.cfg = cfg
        self.tb = None
        self._events = None
        if not self.enabled:
            return
        assert run_dir is not None
        self._events = open(run_dir / "events.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def event(self, kind: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.write(json.dumps({"time": round(time.time(), 3), "event": kind, **fields}) + "\n")

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{prefix}{k}", v, step)

    def figure(self, tag: str, fig, step: int) -> None:
        """Log a matplotlib figure (TensorBoard on) and close it either way: pyplot keeps every open figure."""
        if self.tb is not None:
            self.tb.add_figure(tag, fig, step, close=True)
            return
        import matplotlib.pyplot as plt

        plt.close(fig)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.tb is not None:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.tb.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items() if v is not None}, run_name=".")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self._events is not None:
            self._events.close()
