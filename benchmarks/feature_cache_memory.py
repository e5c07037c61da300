"""Host memory of the in-memory feature cache on one node: peak RSS and proportional set size (PSS: shared pages
split between the processes that map them, so the PSS sum is what the node really holds) per rank.

    torchrun --nproc_per_node=2 benchmarks/feature_cache_memory.py --data /tmp/fc-data --samples 2000 --channels 64

The frozen prefix is one 3x3 convolution (a spatial C x 32 x 32 map per image, fp16 storage): cheap to compute, so
the figure is the cache's own memory. Each rank builds the table and reads one training epoch from it."""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from pathlib import Path

import torch
from torch import nn

from fastft.data.index import index_from_config
from fastft.data.synthetic import make_image_folder
from fastft.data.transforms import TransformSpec
from fastft.features import FeatureLoader, ImageSource, build_features
from fastft.parallel.env import barrier, init_distributed, shutdown
from fastft.precision import Precision


def _pss_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--channels", type=int, default=64)
    args = ap.parse_args()
    env = init_distributed("cpu")
    classes = 4
    if env.is_main:
        make_image_folder(
            args.data, num_classes=classes, train_per_class=args.samples // classes, val_per_class=1, image_size=32
        )
    barrier(env)
    from fastft.config import DataConfig

    samples = index_from_config(DataConfig(root=args.data)).train
    torch.manual_seed(0)
    prefix = nn.Conv2d(3, args.channels, 3, padding=1)
    peak_pss, stop = [_pss_mb()], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak_pss[0] = max(peak_pss[0], _pss_mb())
            time.sleep(0.02)

    base_rss, base_pss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _pss_mb()
    threading.Thread(target=watch, daemon=True).start()
    source = ImageSource(samples, TransformSpec(32, 32), views=0, env=env, batch_size=100, workers=0, seed=0)
    t0 = time.perf_counter()
    table = build_features(
        prefix,
        source,
        mode="memory",
        dtype="fp16",
        cache_dir=Path(args.data) / "cache",
        env=env,
        precision=Precision(torch.float32, "cpu"),
        channels_last=False,
        train=True,
    )
    build_s, pss_built = time.perf_counter() - t0, _pss_mb()
    loader = FeatureLoader(table, 32, train=True, seed=0, rank=env.rank, world=env.world_size)
    loader.set_epoch(0)
    total = sum(float(x.float().sum()) for x, _ in loader)  # one epoch: every rank reads its rows of the table
    barrier(env)
    stop.set()
    row = {
        "rank": env.rank,
        "table_mb": round(sum(p.numel() * p.element_size() for p in table.parts) / 2**20, 1),
        "rss_before_build_mb": round(base_rss, 1),
        "pss_before_build_mb": round(base_pss, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pss_after_build_mb": round(pss_built, 1),
        "pss_after_epoch_mb": round(_pss_mb(), 1),
        "peak_pss_mb": round(max(peak_pss[0], _pss_mb()), 1),
        "build_s": round(build_s, 2),
        "checksum": total,
    }
    print("FCMEM " + json.dumps(row), flush=True)
    shutdown(env)


if __name__ == "__main__":
    main()
