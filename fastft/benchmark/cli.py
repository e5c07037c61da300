"""`fastft bench` / `python -m fastft.benchmark`: the arguments, defined once, and the entry point.

Nothing heavy is imported until a suite runs, so `fastft --help` stays fast.
"""

from __future__ import annotations

import argparse

from fastft.benchmark.suites import SUITES


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--suite",
        choices=sorted(SUITES),
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
        help=(
            "seconds; cases that would start after it, and the probe-wall/save-gap rows whose estimate does not fit "
            "in it, are recorded as skipped (0 = no limit)"
        ),
    )
    p.add_argument(
        "--only",
        default="",
        help=(
            "comma-separated substrings: run only the cases whose name matches (timm: the timm comparison; "
            "probe-wall, save-gap: those rows)"
        ),
    )
    p.add_argument("--no-latest", action="store_true", help="do not (re)write LATEST.md in --out")
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `fastft bench` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="throughput benchmark: images/s, per-step breakdown, ratios to the "
        "forward-only limit (cached modes: to the host's memory bandwidth) and to the naive baseline",
    )
    return add_arguments(p)


def run_bench(args: argparse.Namespace) -> int:
    """Run the suite named by `args`; returns the exit code (0, also when a target is missed: that is a result)."""
    from fastft.benchmark.harness import run

    run(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastft.benchmark", description=__doc__.splitlines()[0])
    return run_bench(add_arguments(parser).parse_args(argv))
