"""One rank of the multi-node feature-cache check: build the train table (disk, then reused; memory) and compare
every row with the prefix run directly on the images. Writes <out>/rank<R>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from fastft.config import DataConfig
from fastft.data.index import index_from_config
from fastft.data.torch_loader import ImageDataset
from fastft.data.transforms import TransformSpec
from fastft.features import ImageSource, build_features
from fastft.parallel.env import init_distributed, shutdown
from fastft.precision import Precision

data, out, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
env = init_distributed("cpu")
samples = index_from_config(DataConfig(root=data)).train[:21]  # 21 rows over 4 ranks: uneven shards
spec = TransformSpec(32, 36)
torch.manual_seed(0)
prefix = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten())
ds = ImageDataset(samples, spec, train=False)
with torch.inference_mode():
    expected = prefix(torch.stack([ds[(i, 0)][0] for i in range(len(samples))]))
sources, diffs = [], []
for mode in ("disk", "disk", "memory"):
    src = ImageSource(samples, spec, views=0, env=env, batch_size=4, workers=0, seed=0)
    table = build_features(
        prefix,
        src,
        mode=mode,
        dtype="fp32",
        cache_dir=Path(cache),
        env=env,
        precision=Precision(torch.float32, "cpu"),
        channels_last=False,
        train=True,
    )
    sources.append(table.source)
    diffs.append(float((table.take(0, torch.arange(len(samples))) - expected).abs().max()))
(out / f"rank{env.rank}.json").write_text(json.dumps({"sources": sources, "max_diff": diffs, "node": env.node_rank}))
shutdown(env)
