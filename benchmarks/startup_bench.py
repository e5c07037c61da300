"""Time to the first optimizer step of a multi-rank CPU run on ~50k tiny JPEGs: two source trees side by side.

    python -m benchmarks.startup_bench --before a30c767 --files 50000 --ranks 2 --repeats 3 \
        --json benchmarks/results/startup-YYYYMMDD.json

The "before" tree is a `git worktree` of `--before` (made under /tmp, removed at the end unless --keep); "after" is
this checkout. Each run is a real `python -m torch.distributed.run --nproc_per_node N -m fastft train ...` on CPU
(gloo): resnet18 at random init (`model.weights=none`), 32 px, batch 8, `data.workers=0`, `optim.max_steps=1`,
`log.every_steps=1`. The tree is chosen by PYTHONPATH, and the runs start from a neutral working directory (`-m` puts
the working directory first on sys.path); every run records which fastft its ranks imported.

Figures per run, all from the launch (wall clock just before the launcher starts):
- `first_step_s`: to the `step` event of step 1 in the run's events.jsonl (rank 0 writes it after the first optimizer
  step; under DDP every rank has reached that step's gradient all-reduce). This is the headline.
- `setup_s`: to the `start` event (written once the index is built, the files are checked, the model is built).
- `exit_s`: to the launcher's exit (includes the final evaluation and the checkpoint writes).

A third tree, "unsharded" (--unsharded-dir), is the "after" commit with one line changed so that every rank checks
every file again: it separates the sharding from the other changes between the two commits (the per-file check itself
changed too: `before` reads a JPEG's first and last bytes, `after` decodes it at 1/8 scale).

Then, on the same files and rank count, a check-only run per tree (this file under torchrun with `--check-rank`):
each rank times the tree's own up-front file check on the train and val lists exactly as `build_loader` calls it
(the same threads), after a barrier; the figure is the slowest rank's seconds.

Runs alternate before/after (ABAB...), so a change in the machine's load hits both sides; medians and the ratio
before/after are printed as markdown, and every run goes to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_VERSION = 1
RUN_ARGS = [
    "--model.name=resnet18",
    "--model.weights=none",
    "--data.image_size=32",
    "--data.batch_size=8",
    "--data.workers=0",
    "--precision.dtype=fp32",
    "--compile.target=none",
    "--optim.max_steps=1",
    "--log.every_steps=1",
    "--log.progress=false",
    "--log.tensorboard=false",
    "--checkpoint.every_epochs=0",
    "--run.device=cpu",
]


# --------------------------------------------------------------------------------------------------------------------
# Data


def _write_jpeg(path: Path, cls: int, index: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(cls * 1_000_003 + index)
    base = np.array([(cls * 53) % 256, (cls * 97) % 256, (cls * 151) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=85)


def make_folder(root: Path, *, files: int, classes: int, val_per_class: int, size: int, threads: int) -> Path:
    """root/train/<class>/ with `files` JPEGs over `classes` classes, root/val/<class>/ with `val_per_class` each.

    Generated once: a manifest written last marks a complete folder, which is reused when its settings match."""
    settings = {
        "version": DATA_VERSION,
        "files": files,
        "classes": classes,
        "val_per_class": val_per_class,
        "size": size,
    }
    manifest = root / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == settings:
        return root
    if root.exists():
        shutil.rmtree(root)
    jobs = []
    for split, per_class in (("train", None), ("val", val_per_class)):
        for c in range(classes):
            n = per_class if per_class is not None else files // classes + (c < files % classes)
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            offset = 0 if split == "train" else 10_000_000
            jobs += [(folder / f"{i:06d}.jpg", c, offset + i, size) for i in range(n)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(lambda job: _write_jpeg(*job), jobs, chunksize=256))
    manifest.write_text(json.dumps(settings))
    return root


def list_files(folder: Path) -> list[str]:
    """Image paths under `folder` in sorted walk order (the order both trees' indexes use)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".jpg")]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Trees and launches


def before_tree(commit: str, path: Path) -> Path:
    """A detached worktree of `commit` at `path` (reused when it is already there at that commit)."""
    want = subprocess.run(["git", "-C", str(REPO), "rev-parse", commit], capture_output=True, text=True, check=True)
    if path.exists():
        have = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
        if have.stdout.strip() == want.stdout.strip():
            return path
        raise SystemExit(f"{path} exists at another commit; remove it (git worktree remove {path})")
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True, capture_output=True
    )
    return path


UNSHARD_FROM = "    if env is None or not env.distributed:\n"
UNSHARD_TO = "    if True:  # control: every rank checks every file\n"


def unsharded_tree(path: Path) -> Path:
    """A detached worktree of this checkout's HEAD at `path` whose file check is not sharded: every rank checks every
    file (checks.find_bad_files takes its one-process branch). Everything else is the "after" code."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    if not path.exists():
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), head.stdout.strip()],
            check=True,
            capture_output=True,
        )
    checks = path / "fastft" / "data" / "checks.py"
    checks.write_text(unshard(checks.read_text(), name=str(checks)))
    return path


def unshard(text: str, *, name: str = "checks.py") -> str:
    """checks.py's source with find_bad_files' one-process branch taken on every rank (idempotent)."""
    if UNSHARD_TO in text:
        return text
    if text.count(UNSHARD_FROM) != 1:
        raise SystemExit(f"{name}: cannot find the sharding branch to switch off")
    return text.replace(UNSHARD_FROM, UNSHARD_TO)


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}


def _torchrun(ranks: int, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={ranks}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fastft_file(tree: Path, cwd: Path) -> str:
    """The fastft that a process launched like the runs imports (PYTHONPATH = tree, the same working directory)."""
    out = subprocess.run(
        [sys.executable, "-c", "import fastft; print(fastft.__file__)"],
        cwd=cwd,
        env=_env(tree),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def first_step_times(events: list[dict], launch: float) -> dict[str, float | None]:
    """Seconds from `launch` (a time.time()) to the run's `start` event and to the `step` event of step 1."""
    start = next((e["time"] for e in events if e.get("event") == "start"), None)
    step = next((e["time"] for e in events if e.get("event") == "step" and e.get("step") == 1), None)
    return {
        "setup_s": None if start is None else start - launch,
        "first_step_s": None if step is None else step - launch,
    }


def train_once(tree: Path, data: Path, work: Path, *, ranks: int, name: str, timeout: int) -> dict:
    """One timed `-m fastft train` launch; its run folder is removed afterwards."""
    cmd = [
        *_torchrun(ranks, _free_port()),
        "-m",
        "fastft",
        "train",
        f"--data.root={data}",
        *RUN_ARGS,
        f"--run.out_dir={work / 'runs'}",
        f"--run.name={name}",
    ]
    launch = time.time()
    proc = subprocess.run(cmd, cwd=work, env=_env(tree), capture_output=True, text=True, timeout=timeout)
    exit_s = time.time() - launch
    run_dir = work / "runs" / name
    out = {**first_step_times(_events(run_dir / "events.jsonl"), launch), "exit_s": exit_s, "rc": proc.returncode}
    if proc.returncode != 0 or out["first_step_s"] is None:
        out["stderr_tail"] = proc.stderr[-3000:]
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def check_once(tree: Path, data: Path, work: Path, *, ranks: int, timeout: int) -> dict:
    """One check-only launch: every rank runs the tree's own up-front file check on train and val."""
    result = work / "check.json"
    result.unlink(missing_ok=True)
    cmd = [
        *_torchrun(ranks, _free_port()),
        str(Path(__file__).resolve()),
        "--check-rank",
        "--data",
        str(data),
        "--json",
        str(result),
    ]
    proc = subprocess.run(cmd, cwd=work, env=_env(tree), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result.exists():
        return {"rc": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    return {"rc": 0, **json.loads(result.read_text())}


# --------------------------------------------------------------------------------------------------------------------
# Check-only rank (runs under torchrun with the tree's fastft on PYTHONPATH)


def _tree_check():
    """(what, check(paths, env)) for the fastft on the path: the sharded all-gathered check where it exists (after),
    else the every-rank-checks-every-file scan (before). `threads` as build_loader passes them: max(2, workers=0)."""
    try:
        from fastft.data import checks
    except ImportError:
        from fastft.data.dali_loader import scan_images

        return "dali_loader.scan_images (every file on every rank)", lambda paths, env: scan_images(paths, threads=2)
    what = "checks.find_bad_files (1/world per rank, all-gathered)"
    if UNSHARD_TO in Path(checks.__file__).read_text():
        what = "checks.find_bad_files, sharding switched off (every file on every rank)"
    return what, lambda paths, env: checks.find_bad_files(paths, threads=2, env=env)


def check_rank(data: Path, out: Path) -> None:
    import torch.distributed as dist

    import fastft
    from fastft.parallel.env import init_distributed

    env = init_distributed("cpu")
    what, check = _tree_check()
    seconds, bad = {}, 0
    for split in ("train", "val"):
        paths = list_files(data / split)
        dist.barrier()
        t0 = time.perf_counter()
        bad += len(check(paths, env))
        seconds[split] = time.perf_counter() - t0
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, {"rank": env.rank, "fastft": fastft.__file__, "seconds": seconds, "bad": bad})
    if env.rank == 0:
        out.write_text(
            json.dumps(
                {
                    "check": what,
                    "ranks": gathered,
                    "check_s": max(sum(r["seconds"].values()) for r in gathered),
                }
            )
        )
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------------
# Orchestration and report


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


KEYS = {
    "first_step_s": "launch -> first step",
    "setup_s": "launch -> start event",
    "exit_s": "launch -> exit",
    "check_s": "file check alone (slowest rank)",
}


def markdown(doc: dict) -> str:
    rows = ["| tree | what | median (s) | runs (s, in launch order) |", "|---|---|---:|---|"]
    for key, what in KEYS.items():
        for label, runs in doc["checks" if key == "check_s" else "runs"].items():
            rows.append(
                f"| {label} | {what} | {_fmt(_median(runs, key))} | " + ", ".join(_fmt(r.get(key)) for r in runs) + " |"
            )
    lines = [*rows, ""]
    for name, ratio in doc["ratios"].items():
        lines.append(f"- {name}: {'-' if ratio is None else f'{ratio:.2f}x'}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = make_folder(
        work / "data",
        files=args.files,
        classes=args.classes,
        val_per_class=args.val_per_class,
        size=32,
        threads=args.threads,
    )
    gen_s = time.perf_counter() - t0
    trees = {"before": before_tree(args.before, Path(args.before_dir))}
    if args.unsharded_dir:
        trees["unsharded"] = unsharded_tree(Path(args.unsharded_dir))
    trees["after"] = REPO
    files = {label: fastft_file(tree, work) for label, tree in trees.items()}
    for label, tree in trees.items():
        if not files[label].startswith(str(tree)):
            raise SystemExit(f"{label}: fastft imported from {files[label]}, not from {tree}")
    doc = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.startup_bench", *sys.argv[1:]]),
        "before_commit": subprocess.run(
            ["git", "-C", str(trees["before"]), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "after_commit": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "fastft_files": files,
        "ranks": args.ranks,
        "train_files": len(list_files(data / "train")),
        "val_files": len(list_files(data / "val")),
        "data_generation_s": gen_s,
        "run_args": RUN_ARGS,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "trees": {label: str(tree) for label, tree in trees.items()},
        "runs": {label: [] for label in trees},
        "checks": {label: [] for label in trees},
    }
    order = list(trees)
    for i in range(args.repeats):
        for label in order if i % 2 == 0 else order[::-1]:
            run = train_once(trees[label], data, work, ranks=args.ranks, name=f"{label}{i}", timeout=args.timeout)
            doc["runs"][label].append(run)
            print(f"{label} run {i}: {json.dumps(run)}", flush=True)
    for i in range(args.check_repeats):
        for label in order if i % 2 == 0 else order[::-1]:
            run = check_once(trees[label], data, work, ranks=args.ranks, timeout=args.timeout)
            doc["checks"][label].append(run)
            print(f"{label} check {i}: {json.dumps(run)}", flush=True)
    doc["loadavg_end"] = os.getloadavg()
    doc["ratios"] = {}
    for label in (x for x in trees if x != "after"):
        for key in KEYS:
            section = "checks" if key == "check_s" else "runs"
            b, a = _median(doc[section][label], key), _median(doc[section]["after"], key)
            doc["ratios"][f"{label}/after {key}"] = b / a if b is not None and a else None
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", default="a30c767", help="commit of the 'before' tree")
    ap.add_argument("--before-dir", default="/tmp/fastft-before", help="where its worktree goes")
    ap.add_argument(
        "--unsharded-dir",
        default="/tmp/fastft-unsharded",
        help="where the unsharded control tree goes ('' = no control tree)",
    )
    ap.add_argument("--work", default="/tmp/fastft-startup", help="scratch folder: data, run folders")
    ap.add_argument("--files", type=int, default=50_000, help="train images")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--val-per-class", type=int, default=10)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed training launches per tree (interleaved)")
    ap.add_argument("--check-repeats", type=int, default=3, help="check-only launches per tree (0 = none)")
    ap.add_argument("--threads", type=int, default=4, help="threads generating the images")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    ap.add_argument("--json", default="", help="write every figure here")
    ap.add_argument("--keep", action="store_true", help="keep the before worktree and the scratch folder")
    ap.add_argument("--check-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check_rank:
        check_rank(Path(args.data), Path(args.json))
        return
    try:
        doc = run_bench(args)
    finally:
        if not args.keep:
            for tree in (args.before_dir, args.unsharded_dir):
                if tree and Path(tree).exists():
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree])
            shutil.rmtree(args.work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(
        f"\n{doc['ranks']} ranks, {doc['train_files']} train + {doc['val_files']} val files; before "
        f"{doc['before_commit']}, after {doc['after_commit']}; fastft imported from {doc['fastft_files']}\n"
    )
    print(markdown(doc))


if __name__ == "__main__":
    main()
