"""`fastft bench`: the throughput harness of `benchmarks/throughput.py`, reachable from the CLI.

Wiring (fastft/cli.py):  `add_bench_parser(sub)` in `_parser()`, and in `run()`
`if args.command == "bench": from fastft.bench import run_bench; return run_bench(args)`.

The harness lives in the source tree's `benchmarks/` folder (it also times the naive baseline loop, which is not part
of the library), so `fastft bench` needs a source checkout; the arguments are defined here, once, so that
`python -m benchmarks.throughput` and `fastft bench` accept the same ones. Nothing heavy is imported until it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITES = ("cpu", "gpu", "smoke")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="cpu",
        help="cpu: resnet18 + resnet50 sized for a 2-core machine (< 15 min); gpu: resnet50 @224 bf16 on "
        "one GPU (< 8 min); smoke: seconds, for the harness's own tests",
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for <hardware>-<date>.json/.md and LATEST.md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=0, help="data workers / DALI threads (0 = the suite's default)")
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds; cases that would start after it are recorded as skipped (0 = no limit)",
    )
    p.add_argument("--only", default="", help="comma-separated substrings: run only the cases whose name matches")
    p.add_argument("--no-latest", action="store_true", help="do not (re)write LATEST.md in --out")
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `fastft bench` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="throughput benchmark: images/s, per-step breakdown, ratios to the "
        "forward-only limit and to the naive baseline",
    )
    return add_arguments(p)


def _import_harness():
    try:
        from benchmarks import throughput
    except ImportError:
        repo = Path(__file__).resolve().parents[1]
        if not (repo / "benchmarks" / "throughput.py").is_file():
            from fastft.errors import ConfigError

            raise ConfigError("fastft bench needs a source checkout of fastft (the benchmarks/ folder)") from None
        sys.path.insert(0, str(repo))
        from benchmarks import throughput
    return throughput


def run_bench(args: argparse.Namespace) -> int:
    """Run the suite named by `args`; returns the exit code (0, also when a target is missed: that is a result)."""
    _import_harness().run(args)
    return 0
