"""Run the fastft CLI recording, per rank, the mask of the first training-mode dropout (the units it zeroes, redrawn
from the same generator state on a tensor of ones) into $PROBE_DIR/rank<R>.json. Used as
`torchrun ... tests/parallel/_dropout_probe.py train ...`."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastft.cli import main

_forward = nn.Dropout.forward
_done: list[bool] = []


def _record(self, x):
    before = torch.get_rng_state()
    out = _forward(self, x)
    if self.training and not _done:
        _done.append(True)
        after = torch.get_rng_state()
        torch.set_rng_state(before)
        mask = F.dropout(torch.ones_like(x), self.p, training=True) == 0
        torch.set_rng_state(after)
        path = Path(os.environ["PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
        path.write_text(json.dumps({"mask": mask.flatten().tolist(), "dropped_fraction": float(mask.float().mean())}))
    return out


nn.Dropout.forward = _record
sys.exit(main())
