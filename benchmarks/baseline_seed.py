"""The seed baseline alone: the article's plain fine-tuning loop (`fastft.benchmark.baseline`, which the throughput
suites compare every mode with), run on one folder and printed as JSON.

    python -m benchmarks.baseline_seed --data DIR --model resnet50 --epochs 10 --batch-size 32 --workers 2

What it does and what fastft does differently: see `fastft/benchmark/baseline.py`.
"""

from __future__ import annotations

import argparse
import json

from fastft.benchmark.baseline import run_seed


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with train/ and val/ class folders")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=0, help="0 = the weights' preset crop")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    result = run_seed(
        args.data,
        model_name=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        image_size=args.image_size,
        device=args.device,
    )
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
