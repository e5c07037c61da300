"""Running a suite: stamps (hardware, versions), the side-by-side run, the host's memory bandwidth, every mode between
two limit measurements, the probe-wall and save-gap rows, the timm comparison, then ratios, targets and the results
files. `fastft bench` calls `run(args)`."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from fastft.benchmark import cases, data, headline, measure, probe_wall, save_gap, timm_compare
from fastft.benchmark.analysis import attach_ratios, evaluate_targets
from fastft.benchmark.report import SCHEMA_VERSION, validate, write_results
from fastft.benchmark.suites import Block, Case, Suite, get_suite


def hardware(device: torch.device) -> dict:
    from fastft.precision import cpu_has_native_bf16

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "hostname": socket.gethostname(),
        "cpu_model": data.cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "gpu_model": torch.cuda.get_device_name(0) if gpus else None,
        "gpu_count": gpus,
        "device": str(device),
        "load_avg_start": os.getloadavg(),
    }


def versions() -> dict:
    import numpy

    import fastft

    return {
        **data.versions(),
        "fastft": fastft.__version__,
        "fastft_commit": source_commit(),
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }


def source_commit() -> str | None:
    """The checkout's commit ("+dirty" with uncommitted changes to tracked files); None outside a git checkout."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():  # an installed package: a git checkout around it is not its source
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "--short=12", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def new_document(suite: Suite, args: argparse.Namespace, device: torch.device, run_id: str) -> dict:
    """The results document before anything is measured: stamps, settings and empty sections."""
    s = suite.settings
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "fastft-throughput",
        "run_id": run_id,
        "suite": suite.name,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": _command(args),
        "hardware": hardware(device),
        "versions": versions(),
        "settings": {
            **asdict(s),
            "headline": asdict(suite.headline) if suite.headline else None,
            "notes": suite.notes,
            "time_budget_s": args.time_budget,
        },
        "limit_measurements": [],
        "limits": [],
        "baselines": [],
        "cases": [],
        "headline": None,
        "timm": None,
        "probe_wall": None,
        "save_gap": None,
        "memcpy": None,
        "targets": [],
        "wall_s": None,
    }


class SuiteRun:
    """One run of a suite: the results document it fills, its limit log, its clock and its scratch folder."""

    def __init__(self, suite: Suite, args: argparse.Namespace, device: torch.device, work: Path) -> None:
        self.suite, self.s, self.args, self.device, self.work = suite, suite.settings, args, device, work
        self.run_id = uuid.uuid4().hex[:12]
        self.t_start = time.perf_counter()
        self.doc = new_document(suite, args, device, self.run_id)
        self.limits = measure.LimitLog(self.doc["limit_measurements"], self.s, device, self.run_id)
        self.only = [o.strip() for o in args.only.split(",") if o.strip()]

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t_start:6.0f}s] {msg}", flush=True)

    def over_budget(self) -> bool:
        return bool(self.args.time_budget) and time.perf_counter() - self.t_start > self.args.time_budget

    def measure_all(self) -> None:
        hw = self.doc["hardware"]
        self.say(
            f"suite {self.suite.name} on {self.device} ({hw['cpu_model']}, {hw['cores_available']} cores"
            f"{', ' + str(hw['gpu_model']) if hw['gpu_count'] else ''}); run {self.run_id}"
        )
        # The side-by-side run first: it carries the targets, and a time budget must not cut it.
        if self.suite.headline and not self.only:
            self.side_by_side()
        blocks = [
            (b, [c for c in b.cases if not self.only or any(o in f"{c.model} {c.name}" for o in self.only)])
            for b in self.suite.blocks
        ]
        if any(c.cache != "off" for _, cs in blocks for c in cs):  # what bounds the cached modes, once per run
            self.doc["memcpy"] = measure.measure_memcpy(run_id=self.run_id)
            self.say(f"host memcpy: {self.doc['memcpy']['bytes_per_s'] / 1e9:.2f} GB/s")
        for block, selected in blocks:
            if selected:
                self.block(block, selected)
        for key, spec, measure_row in (
            ("probe_wall", self.suite.probe_wall, probe_wall.run_row),
            ("save_gap", self.suite.save_gap, save_gap.run_row),
        ):
            if spec is not None and (not self.only or key.replace("_", "-") in self.only or key in self.only):
                self.doc[key] = self.row(key, spec, measure_row)
        if self.suite.timm and (not self.only or "timm" in self.only) and not self.over_budget():
            self.timm()

    def row(self, key: str, spec, measure_row) -> dict:
        """One of the suite's single rows (probe wall, save gap): skipped when its estimate does not fit in the time
        budget, an error entry when it fails (the other figures are kept)."""
        elapsed = time.perf_counter() - self.t_start
        if self.args.time_budget and elapsed + spec.estimate_s > self.args.time_budget:
            reason = (
                f"time budget of {self.args.time_budget:.0f}s: {elapsed:.0f}s spent, the row takes about "
                f"{spec.estimate_s:.0f}s"
            )
            self.say(f"{key}: skipped ({reason})")
            return {"status": "skipped", "reason": reason, **asdict(spec)}
        try:
            entry = measure_row(spec, self.s, device=self.device, run_id=self.run_id, work=self.work, say=self.say)
        except Exception as e:  # one failing row must not lose the others' figures
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.say(f"{key}: error ({type(e).__name__}: {first_line})")
            return {"status": "error", "reason": f"{type(e).__name__}: {first_line}", **asdict(spec)}
        ratio = entry["ratio_median"] if key == "probe_wall" else entry["ratio"]
        self.say(f"{key}: ratio {ratio:.2f} (target <= {entry['target']}: {'met' if entry['met'] else 'missed'})")
        return entry

    def timm(self) -> None:
        t = self.suite.timm
        self.say(f"timm comparison: {t.model}, {', '.join(t.modes)}, {t.pairs} alternated pairs each")
        self.doc["timm"] = timm_compare.run_comparison(
            t, self.s, device=self.device, run_id=self.run_id, work=self.work
        )
        for mode, m in self.doc["timm"]["modes"].items():
            self.say(f"timm comparison {mode}: fastft / timm = {m['ratio_median']:.2f} (pairs {m['ratios']})")

    def side_by_side(self) -> None:
        h = self.suite.headline
        self.say(f"headline: {h.model}, {h.epochs} epochs, cached fastft vs seed loop")
        entry, base = headline.run_headline(
            h, self.s, self.limits, device=self.device, run_id=self.run_id, work=self.work
        )
        self.doc["headline"] = entry
        self.doc["baselines"].append(base)
        self.say(
            "headline: first epochs "
            + ", ".join(f"{f['name']} {f['images_per_s']:.1f} img/s" for f in entry["first_epochs"])
            + f"; cached {entry['fastft_cached']['wall_s']:.1f}s vs seed {entry['baseline']['wall_s']:.1f}s"
        )

    def block(self, block: Block, selected: list[Case]) -> None:
        if block.baseline_epochs and block.model not in {b["model"] for b in self.doc["baselines"]}:
            self.doc["baselines"].append(cases.block_baseline(block, self.s, device=self.device, run_id=self.run_id))
            self.say(f"{block.model} seed baseline: {self.doc['baselines'][-1]['images_per_s']:.1f} img/s")
        for case in selected:
            entry = self.mode(case)
            self.doc["cases"].append(entry)
            self.say(
                f"{entry['name']}: "
                + (
                    f"{entry['images_per_s']:.1f} img/s"
                    if entry["status"] == "ok"
                    else f"{entry['status']} ({entry['reason']})"
                )
            )

    def mode(self, case: Case) -> dict:
        """One mode between two limit measurements; a skipped or failing mode is an entry too."""
        name = f"{case.model} {case.name}"
        budget = f"time budget of {self.args.time_budget:.0f}s spent"
        reason = budget if self.over_budget() else cases.skip_reason(case, self.device)
        if reason:
            return {"name": name, "status": "skipped", "config": asdict(case), "reason": reason}
        try:
            before = self.limits.measure(case.model, case.precision, f"before {name}", reuse=True)
            entry = cases.run_case(case, self.s, device=self.device, run_id=self.run_id, work=self.work)
            entry["limit_ids"] = [before, self.limits.measure(case.model, case.precision, f"after {name}")]
            return entry
        except Exception as e:  # one failing mode must not lose the others' figures
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return {
                "name": name,
                "status": "error",
                "config": asdict(case),
                "reason": f"{type(e).__name__}: {first_line}",
            }

    def finish(self) -> dict:
        """Ratios, targets and the end stamps, from this document only; checked against the schema."""
        doc = self.doc
        attach_ratios(doc)
        for lim in doc["limits"]:
            self.say(
                f"limit {lim['key']}: {lim['images_per_s']:.1f} img/s ({len(lim['repeats_images_per_s'])} repeats)"
            )
        doc["targets"] = evaluate_targets(doc)
        doc["hardware"]["load_avg_end"] = os.getloadavg()
        doc["wall_s"] = time.perf_counter() - self.t_start
        validate(doc)
        return doc


def run(args: argparse.Namespace) -> dict:
    """Run a suite and write its results; returns the results document."""
    suite = get_suite(args.suite)
    s = suite.settings
    if args.workers:
        s.workers = args.workers
    device = measure.resolve_device(args.device if args.device != "auto" else s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    s.device = str(device)
    work = Path(tempfile.mkdtemp(prefix="fastft-bench-"))
    r = SuiteRun(suite, args, device, work)
    try:
        r.measure_all()
    except KeyboardInterrupt:  # a hard stop (gpu_check.sh's timeout sends SIGINT): keep what was measured
        r.doc["interrupted"] = True
        r.say("interrupted: writing the modes measured so far")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = r.finish()
    json_path, md_path = write_results(doc, Path(args.out), latest=not args.no_latest)
    r.say(f"wrote {json_path} and {md_path}")
    return doc


def _command(args: argparse.Namespace) -> str:
    """The equivalent command line (the same whether the run came from `fastft bench` or `python -m ...`)."""
    parts = [f"--suite {args.suite}", f"--out {args.out}"]
    if args.device != "auto":
        parts.append(f"--device {args.device}")
    if args.workers:
        parts.append(f"--workers {args.workers}")
    if args.time_budget:
        parts.append(f"--time-budget {args.time_budget:g}")
    if args.only:
        parts.append(f"--only '{args.only}'")
    return "fastft bench " + " ".join(parts)
