"""StopSignal: SIGTERM and SIGUSR1 (Slurm's time-limit warning) become a request the loop sees at its next step
boundary; the handlers that were there before come back when the run ends. (The multi-rank agreement and the save
are tested end to end in tests/reliability/test_kill_resume.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from fastft.parallel.env import DistEnv, StopSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_is_a_request_not_an_exit_and_handlers_come_back(sig) -> None:
    seen: list[int] = []
    previous = signal.signal(sig, lambda signum, frame: seen.append(signum))
    try:
        stop = StopSignal(DistEnv())
        assert not stop.requested()
        os.kill(os.getpid(), sig)
        assert stop.requested() and stop.received == signal.Signals(sig).name
        assert not seen  # the run's handler took it
        stop.close()
        os.kill(os.getpid(), sig)
        assert seen == [sig]  # the caller's handler is back
    finally:
        signal.signal(sig, previous)
