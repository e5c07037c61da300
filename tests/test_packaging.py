"""`make setup` installs the DALI wheel built for the installed torch's CUDA major. Run against a stand-in venv whose
python records pip's arguments and reports a torch of a chosen CUDA version (nothing is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STUB = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then echo "$@" >> "$RECORD"; exit 0; fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("cuda,extra", [("12.8", "dali-cuda12"), ("13.0", "dali-cuda13"), (None, "dali-cuda13")])
def test_make_setup_installs_the_dali_extra_of_torchs_cuda_major(tmp_path, cuda, extra) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(STUB)
    (venv / "bin" / "python").chmod(0o755)
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from torch import version\n")
    (fake / "version.py").write_text(f"cuda = {cuda!r}\n")
    record = tmp_path / "pip.txt"
    env = {**os.environ, "RECORD": str(record), "REAL_PYTHON": sys.executable, "PYTHONPATH": str(fake.parent)}
    p = subprocess.run(
        ["make", "-C", str(REPO), "setup", f"VENV={venv}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    installs = record.read_text().splitlines()
    assert installs[-1].endswith(f"-e .[{extra}]"), installs
    assert not any("nvidia-dali" in line or "[dali," in line for line in installs)  # one DALI, the matching one


def test_the_dali_extras_name_one_wheel_per_cuda_major() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [d.split(">=")[0] for d in extras["dali-cuda12"]] == ["nvidia-dali-cuda120"]
    assert [d.split(">=")[0] for d in extras["dali-cuda13"]] == ["nvidia-dali-cuda130"]
    assert extras["dali"] == extras["dali-cuda13"]
