"""Run the fastft CLI with one training image that never finishes loading: the torchvision loader's read of the file
named by STALL_FILE blocks forever (the up-front file check still reads it normally). Used as
`torchrun ... tests/parallel/_stall.py train ...` to hold a run at a known step while it is killed."""

import os
import sys
import threading

import fastft.data.torch_loader as torch_loader
from fastft.cli import main

_open = torch_loader.open_regular


def _stalling(path: str):
    if os.path.abspath(path) == os.path.abspath(os.environ["STALL_FILE"]):
        threading.Event().wait()  # until the process is killed
    return _open(path)


torch_loader.open_regular = _stalling
sys.exit(main())
