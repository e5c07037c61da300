"""launchers/slurm.sbatch without Slurm: srun, scontrol and torchrun's python are stand-ins that record what the
script asks of them (the training itself is covered by the torchrun tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import REPO

SBATCH = REPO / "launchers" / "slurm.sbatch"

SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done  # srun's own options
exec "$@"
"""
SCONTROL = """#!/usr/bin/env bash
if [ "$1 $2" = "show hostnames" ]; then echo node7; echo node8; exit 0; fi
echo "$@" >> "$RECORD/scontrol"
"""
# torchrun's python: records its arguments and environment, then (with FAKE_SLEEP) trains until SIGTERM.
PYTHON = """#!/usr/bin/env python3
import json, os, signal, sys, time
from pathlib import Path
rec = Path(os.environ["RECORD"])
keys = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE")
(rec / "python.json").write_text(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}))
def stop(*_):
    (rec / "stopped").write_text("SIGTERM")
    sys.exit(2)
signal.signal(signal.SIGTERM, stop)
(rec / "started").write_text("1")
for _ in range(int(os.environ.get("FAKE_SLEEP", "0")) * 20):
    time.sleep(0.05)
"""


def _fakes(tmp: Path) -> dict[str, str]:
    bin_ = tmp / "bin"
    bin_.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    rec = tmp / "rec"
    rec.mkdir()
    return {
        **os.environ,
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "PYTHON": str(bin_ / "python"),
        "RECORD": str(rec),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[7-8]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
    }


def test_gpus_of_the_form_type_n_and_overrides_passed_as_given(tmp_path) -> None:
    env = {**_fakes(tmp_path), "SLURM_GPUS_PER_NODE": "h100:4"}
    p = subprocess.run(
        ["bash", str(SBATCH), "run config.toml", "--run.name=two words", "--optim.lr=0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    got = json.loads((tmp_path / "rec" / "python.json").read_text())
    assert "--nproc_per_node=4" in got["argv"] and "--nnodes=2" in got["argv"]
    assert "--rdzv_backend=c10d" in got["argv"] and "--rdzv_endpoint=node7:29500" in got["argv"]
    assert "--rdzv_id=4242" in got["argv"] and any(a.startswith("--max_restarts=") for a in got["argv"])
    tail = got["argv"][got["argv"].index("fastft") + 1 :]
    assert tail == ["train", "--config", "run config.toml", "--resume=auto", "--run.name=two words", "--optim.lr=0.1"]
    assert got["env"]["MASTER_ADDR"] == "node7" and got["env"]["NPROC_PER_NODE"] == "4"
    assert not (tmp_path / "rec" / "scontrol").exists()  # finished: no requeue


def test_usr1_before_the_time_limit_stops_the_run_then_requeues(tmp_path) -> None:
    env = {**_fakes(tmp_path), "SLURM_GPUS_PER_NODE": "2", "FAKE_SLEEP": "60"}
    job = subprocess.Popen(["bash", str(SBATCH), "run.toml"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "rec" / "started").exists():
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` delivers
        _, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert (tmp_path / "rec" / "stopped").read_text() == "SIGTERM"  # the run got SIGTERM: it saves and stops
    assert (tmp_path / "rec" / "scontrol").read_text().split() == ["requeue", "4242"]  # only after the run ended
    assert job.returncode == 0 and "requeueing job 4242" in err
