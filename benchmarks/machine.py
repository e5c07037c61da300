"""What every benchmark record states about where it ran: the CPU, the thread count, the versions, the load."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """lscpu's model name (the processor string platform gives is often empty on Linux)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1/5/15-minute load averages: the host may be shared, and a record says how busy it was."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def hardware_line(*libraries: str) -> str:
    """`Hardware: <cpu>, N threads, load a / b / c. Python x, torch y, <library> z, ...` for a record's header."""
    import importlib

    import torch

    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in libraries:
        versions.append(f"{name} {importlib.import_module(name).__version__}")
    return (
        f"Hardware: {cpu_name()}, {torch.get_num_threads()} threads, load average {load_average()} when written. "
        + ", ".join(versions)
        + "."
    )
