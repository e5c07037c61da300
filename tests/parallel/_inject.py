"""Run the fastft CLI with a fault injected: FAIL_STEP=k makes optimizer step k raise on rank FAIL_RANK (or all
ranks when FAIL_RANK is unset). Used by the multi-process tests as `torchrun ... tests/parallel/_inject.py train ...`.
"""

import os
import sys

from fastft.cli import main
from fastft.parallel.backend import LocalBackend

_step = LocalBackend.step
_calls = {"n": 0}


def _faulty(self, boundary=True):
    if boundary:
        _calls["n"] += 1
        rank = os.environ.get("FAIL_RANK")
        if _calls["n"] == int(os.environ["FAIL_STEP"]) and (rank is None or rank == os.environ.get("RANK", "0")):
            raise RuntimeError(f"injected fault at step {_calls['n']}")
    return _step(self, boundary)


LocalBackend.step = _faulty
sys.exit(main())
