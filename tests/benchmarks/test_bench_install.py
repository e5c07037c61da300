"""Dependencies point one way: fastft never imports benchmarks/ (or tests/), and `fastft bench` runs from a wheel
installed away from the source tree."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
    return out


def test_the_package_never_imports_benchmarks_or_tests() -> None:
    offenders = sorted(
        f"{p.relative_to(REPO)}: {m}"
        for p in (REPO / "fastft").rglob("*.py")
        for m in _imported_modules(p)
        if m.split(".")[0] in ("benchmarks", "tests")
    )
    assert offenders == []


def test_importing_the_harness_loads_nothing_from_the_source_tree(tmp_path) -> None:
    # From a folder with no benchmarks/ beside it, every harness module imports, and none pulls in benchmarks.
    names = sorted(p.stem for p in (REPO / "fastft" / "benchmark").glob("*.py") if p.stem != "__main__")
    assert {"cli", "harness", "worker", "report"} <= set(names)
    code = (
        f"import importlib, json, sys\nfor n in {names!r}: importlib.import_module('fastft.benchmark.' + n)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'tests'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


@pytest.mark.slow
def test_fastft_bench_smoke_runs_from_a_wheel_installed_outside_the_source_tree(tmp_path) -> None:
    """Build a wheel (no network: the venv's setuptools), install it into a bare folder, and run the smoke suite with
    only that folder on the path, from a cwd without the checkout: the results document comes out valid."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    src, wheels, target, work = tmp_path / "src", tmp_path / "whl", tmp_path / "inst", tmp_path / "cwd"
    work.mkdir()
    # Build from a copy of what the wheel is made of: the build leaves build/ and *.egg-info beside its source.
    shutil.copytree(REPO / "fastft", src / "fastft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        cwd=tmp_path,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = wheels.glob("fastft-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "fastft", "bench", "--suite", "smoke", "--out", str(work / "res")],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (doc_path,) = (work / "res").glob("*.json")
    doc = json.loads(doc_path.read_text())
    check = (
        "import json, sys, fastft\nfrom fastft.benchmark.report import validate\n"
        f"validate(json.load(open({str(doc_path)!r})))\nprint(fastft.__file__)"
    )
    where = subprocess.run(
        [sys.executable, "-c", check], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(target)  # the installed copy ran, not the checkout
    assert [c["status"] for c in doc["cases"]] == ["ok", "ok"] and doc["versions"]["fastft_commit"] is None
    assert doc["headline"]["time_ratio_fastft_over_baseline"] > 0 and doc["memcpy"]["bytes_per_s"] > 0
    assert (work / "res" / "LATEST.md").is_file()
    # The probe-wall and save-gap rows run from the wheel too (their code is in the package, not in benchmarks/).
    assert doc["probe_wall"]["status"] == "ok" and doc["probe_wall"]["ratio_median"] > 0
    assert doc["save_gap"]["status"] == "ok" and doc["save_gap"]["ratio"] > 0
