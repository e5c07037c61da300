"""Images/s of the torchvision training loader with and without an `[augment]` policy, in one process.

    python benchmarks/augment_loader.py --images 512 --workers 2 --repeats 2

Photo-like JPEGs (224-320 px, `fastft.benchmark.data.synthetic_folder`), crop 224, batch 32. The settings alternate
(none, randaugment, none, randaugment, ...) so a busy machine slows both alike; the median of each is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fastft.benchmark.data import synthetic_folder
from fastft.config import AugmentConfig, DataConfig
from fastft.data.index import index_from_config
from fastft.data.torch_loader import TorchLoader
from fastft.data.transforms import TransformSpec

SETTINGS = {
    "none": None,
    "randaugment": AugmentConfig(policy="randaugment"),
}


def _img_s(samples, aug, workers: int) -> float:
    loader = TorchLoader(
        samples, TransformSpec(224, 256), train=True, batch_size=32, workers=workers, pixel_aug=aug,
        persistent_workers=False,
    )  # fmt: skip
    loader.set_epoch(0)
    t0 = time.perf_counter()
    n = sum(images.shape[0] for images, _ in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    root = synthetic_folder(args.images)
    samples = index_from_config(DataConfig(root=str(root), val_fraction=0.01)).train
    runs: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for _ in range(args.repeats):
        for name, aug in SETTINGS.items():
            runs[name].append(_img_s(samples, aug, args.workers))
    result = {name: {"img_s_median": statistics.median(v), "img_s": v} for name, v in runs.items()}
    print(json.dumps({"images": len(samples), "workers": args.workers, **result}, indent=1))


if __name__ == "__main__":
    main()
