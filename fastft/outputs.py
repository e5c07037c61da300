"""Output targets: every path a command writes is checked before any work starts.

One rule for train, eval and predict:
1. an output never replaces an input of the same command (checkpoint, data, config, weights; hard links included);
2. an existing file is replaced only when fastft wrote it: a predictions CSV (by its header), an evaluation report (by
   its content) with ``--overwrite``, a run folder's outputs (by name) with ``--overwrite`` or when resuming;
3. the checks create nothing: a refused command leaves no folder behind; a run folder is made (and, with
   ``--overwrite``, cleared of the old run's outputs) only once every check has passed (:func:`open_run_dir`);
4. writes are atomic (temp file + rename), and a failed write removes its temp file and the folders it made.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from fastft.errors import ConfigError

PREDICTIONS_HEADER = "path,label,probability"
TEXT_PREDICTIONS_HEADER = "line,text,label,probability"  # a text model's predictions
MULTILABEL_PREDICTIONS_HEADER = "path,labels"  # then one probability column per label, named by the label
REPORT_FILES = ("metrics.json", "confusion_matrix.png", "report.html")
# Everything a run writes into its folder; `--overwrite` removes exactly these, never other files.
RUN_OUTPUTS = (
    "last.pt",
    "best.pt",
    "events.jsonl",
    "metrics.json",
    "confusion_matrix.png",
    "report.html",
    "model.safetensors",
    "model.json",
    "head.safetensors",
    "head.json",
    "config.toml",
    "skipped_files.txt",
)
RUN_OUTPUT_DIRS = ("tensorboard", "deepspeed")


def _exists(path: Path) -> bool:
    return os.path.lexists(path)  # False (not an error) below a file or in a folder that cannot be searched


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` name one file: same path after resolving links, or hard links to one inode."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        return _exists(a) and _exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def refuse_inputs(targets: list[Path], inputs: dict[str, Path | None], *, what: str) -> None:
    """Raise ConfigError when an output target is one of the command's input files."""
    for target in targets:
        for label, src in inputs.items():
            if src is not None and str(src) and same_file(target, src):
                raise ConfigError(
                    f"{what}: {target} is this command's {label} ({src}); writing would destroy it: "
                    "choose another output path"
                )


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing ancestor."""
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(target: Path, *, what: str) -> None:
    """The folder `target` would be written in can take a write: the folder itself when it exists, else its nearest
    existing ancestor (where the missing folders would be made). Creates nothing that outlives the call."""
    folder = existing_ancestor(target)
    if not folder.is_dir():
        raise ConfigError(f"{what} {target} is not writable: {os.strerror(errno.ENOTDIR)} ({folder})")
    probe = folder / f".fastft-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"0" * 4096)  # a real write: read-only mounts, quotas and size limits fail here
    except OSError as e:
        raise ConfigError(f"{what} {target} is not writable: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# --------------------------------------------------------------------------------------------------------------------
# predict: one CSV file


def is_predictions_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            head = f.readline().rstrip("\r\n")
            return head in (PREDICTIONS_HEADER, TEXT_PREDICTIONS_HEADER) or head.startswith(
                MULTILABEL_PREDICTIONS_HEADER + ","
            )
    except (OSError, UnicodeDecodeError):
        return False


def check_predict_target(out: Path, *, checkpoint: Path, inputs: Path) -> None:
    """`fastft predict --out`: a new file, or a predictions CSV fastft wrote before; never an input."""
    refuse_inputs([out], {"checkpoint": checkpoint, "input": inputs}, what="--out")
    if inputs.is_dir() and _exists(out) and _inside(out, inputs) and not is_predictions_csv(out):
        raise ConfigError(f"--out: {out} is a file inside the --input folder {inputs}; choose another output path")
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give the path of a CSV file to write")
    if _exists(out) and not is_predictions_csv(out):
        raise ConfigError(
            f"--out: {out} exists and is not a fastft predictions CSV (first line {PREDICTIONS_HEADER!r}); "
            "it is left as it is: choose another path"
        )
    check_writable(out.parent, what="--out folder")


# --------------------------------------------------------------------------------------------------------------------
# eval: a report folder


def _is_fastft_report_file(path: Path) -> bool:
    try:
        if path.name == "metrics.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            multilabel = isinstance(data, dict) and data.get("task") == "multilabel"  # no confusion matrix
            return isinstance(data, dict) and ("confusion_matrix" in data or multilabel) and "num_samples" in data
        if path.name == "report.html":
            from fastft.report_html import MARKER

            return MARKER in path.read_text(encoding="utf-8")[:1000]
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except (OSError, ValueError):
        return False


def check_report_target(out_dir: Path, *, checkpoint: Path, data: Path, overwrite: bool) -> None:
    """`fastft eval --out`: a folder (new or existing) whose report files (REPORT_FILES) are replaced only
    with `--overwrite` and only when fastft wrote them; never an input."""
    if _exists(out_dir) and not out_dir.is_dir():
        raise ConfigError(f"--out: {out_dir} exists and is not a folder; give a folder for the report")
    targets = [out_dir / name for name in REPORT_FILES]
    refuse_inputs(targets, {"checkpoint": checkpoint, "data": data}, what="--out")
    for t in targets:
        if not _exists(t):
            continue
        if not overwrite:
            raise ConfigError(f"--out: {t} already exists: pass --overwrite to replace it, or choose another folder")
        if t.is_dir() or not _is_fastft_report_file(t):
            raise ConfigError(f"--out: {t} exists and was not written by fastft; it is left as it is")
    check_writable(out_dir, what="--out folder")


# --------------------------------------------------------------------------------------------------------------------
# train: a run folder


def check_run_dir(run_dir: Path, *, overwrite: bool, inputs: dict[str, Path | None] | None = None) -> None:
    """A new run folder: refused when it holds files (unless `overwrite`), when one of its outputs is an input of the
    run, or when it cannot take a write. Nothing is created or removed here (see :func:`open_run_dir`)."""
    try:
        busy = run_dir.is_dir() and any(run_dir.iterdir())
    except OSError as e:
        raise ConfigError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
    if busy and not overwrite:
        raise ConfigError(f"run folder {run_dir} already exists: pass --run.overwrite=true or another --run.name")
    refuse_inputs([run_dir / n for n in RUN_OUTPUTS], inputs or {}, what="run folder")
    check_writable(run_dir, what="run folder")


def run_inputs(cfg, config_file: str | Path | None = None) -> dict[str, Path | None]:
    """The files a training run reads besides its data folder (each must stay untouched by the run's outputs)."""
    weights = cfg.model.weights
    path_like = weights.endswith((".pt", ".pth", ".safetensors")) or "/" in weights
    return {
        "config file": Path(config_file) if config_file else None,
        "model.weights": Path(weights) if path_like else None,
        "data.train_list": Path(cfg.data.train_list) if cfg.data.train_list else None,
        "data.val_list": Path(cfg.data.val_list) if cfg.data.val_list else None,
        "parallel.deepspeed_config": Path(cfg.parallel.deepspeed_config) if cfg.parallel.deepspeed_config else None,
    }


def check_config_file(config_file: str | Path | None, cfg) -> None:
    """`train --config`: the file must not be the config.toml that this run writes into its folder."""
    if not config_file:
        return
    folders = [Path(cfg.run.out_dir) / cfg.run.name] if cfg.run.name else []
    if cfg.checkpoint.resume and cfg.checkpoint.resume != "auto":
        folders.append(Path(cfg.checkpoint.resume).parent)
    refuse_inputs([f / "config.toml" for f in folders], {"config file": Path(config_file)}, what="run folder")


def check_run_not_in_data(run_dir: Path, data_cfg) -> None:
    """A run folder inside the image folders it reads would turn its outputs into data (a new class folder)."""
    if not data_cfg.root:
        return
    root = Path(data_cfg.root)
    split = (root / data_cfg.train_dir).is_dir()
    for folder in (root / data_cfg.train_dir, root / data_cfg.val_dir) if split else (root,):
        if folder.is_dir() and _inside(run_dir, folder):
            raise ConfigError(f"run folder {run_dir} is inside the data folder {folder}: choose another run.out_dir")


def open_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Called once every check has passed: make the run folder and, with `overwrite`, remove the previous run's outputs
    (fastft's own files only: a stale last.pt must never be resumed; other files stay)."""
    try:
        if overwrite and run_dir.is_dir():
            clear_outputs(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None


def only_outputs(run_dir: Path) -> bool:
    """True when the folder holds only fastft's own outputs (nothing a user put there)."""
    return all(
        p.name in RUN_OUTPUTS or p.name in RUN_OUTPUT_DIRS or (p.name.startswith(".") and ".tmp" in p.name)
        for p in run_dir.iterdir()
    )


def clear_outputs(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_OUTPUT_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for tmp in run_dir.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success it replaces `path`, on failure the temp file and any folder made
    for it are removed (nothing half-written, no empty folder)."""
    made: list[Path] = []
    folder = path.parent
    while not _exists(folder) and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        for d in made:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
