"""A world-size > 1 mode: the same fastft call under torchrun (gloo on CPU, nccl on GPU), and each rank's side of it.

python -m torch.distributed.run --nproc_per_node=N -m fastft.benchmark.worker SPEC.json
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from fastft.benchmark import measure
from fastft.benchmark.measure import sync_for, time_calls


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(cfg, world: int, tmp: Path) -> dict:
    spec, result = tmp / "case.json", tmp / "result.json"
    spec.write_text(json.dumps({"config": cfg.to_dict(), "result": str(result)}))
    threads = max(1, len(os.sched_getaffinity(0)) // world)
    # The ranks import fastft from where this process did (a checkout or an install), whatever their cwd.
    where = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [where, os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={world}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "fastft.benchmark.worker",
        str(spec),
    ]
    proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(result.read_text())


def worker_main(spec_path: str) -> None:
    """One rank of a world-size > 1 mode (under torchrun): fastft adopts this process group and leaves it to us, so
    the trainable parameters' all-reduce can be timed on it afterwards."""
    import torch.distributed as dist

    from fastft.config import config_from_dict
    from fastft.data.index import index_from_config
    from fastft.model import build_model, count_parameters, freeze

    spec = json.loads(Path(spec_path).read_text())
    cfg = config_from_dict(spec["config"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cfg.run.device.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    result, lines, wall = measure.finetune_quiet(cfg)
    model = build_model(cfg.model, index_from_config(cfg.data, seed=cfg.run.seed).num_classes, pretrained_ok=False)
    freeze(model, cfg.model.freeze)
    trainable, _ = count_parameters(model)
    grads = torch.zeros(trainable, device=device)  # fp32 gradients, as DDP reduces them
    secs = time_calls(lambda: dist.all_reduce(grads), warmup=3, iters=10, repeats=3, sync=sync_for(device))
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(
            json.dumps(
                {
                    "timings": result.timings,
                    "throughput": result.throughput,
                    "log": lines,
                    "wall_s": wall,
                    "feature_cache": result.feature_cache,
                    "comm_s_per_step": statistics.median(secs) / 10,
                    "comm_bytes": 4 * trainable,
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    worker_main(sys.argv[1])
