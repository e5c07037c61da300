"""The dataset index: scan and validate an ImageFolder tree or a CSV file list into (path, label) samples with one
class index, and split train/val.

Behaviour (documented in the README):
- Classes are the sorted names of the sub-folders that hold at least one image; the index is their position. Both
  loaders (torchvision and DALI) use this one mapping, so a checkpoint evaluates identically with either.
- Hidden files and folders (".name") are ignored; files without an image extension are ignored.
- Symlinks to files are followed (once: the file they name is read). A folder symlink is followed only when its
  target lies outside the data folder: one that points back into it (`loop -> .`, `up -> ..`, a link to another class)
  would index images twice or under another class's label, and is an error naming the link and its target.
- Whether each file is readable is decided later, by the bad-file checks (checks.py), not here.
- A class folder with no images is an error naming the folder.
- Train and val must have the same classes; a val folder with a class unknown to train is an error, a val folder
  missing some train classes is allowed (those classes simply get no support).
- Without train/ and val/ folders, class folders are split into train/val by a seeded stratified fraction.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from fastft.config import DataConfig
from fastft.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Sample = tuple[str, int]  # (path, class index); a multilabel sample's label is its multi-hot tuple (data/multilabel.py)


@dataclass
class DatasetIndex:
    classes: list[str]
    train: list[Sample] = field(default_factory=list)
    val: list[Sample] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def list_images(folder: str | Path, *, dataset: str | Path | None = None) -> list[str]:
    """Image paths under `folder`, recursively, in sorted walk order; hidden entries are skipped.

    Folder symlinks are followed unless their target resolves inside `dataset` (default: `folder`) or to a folder
    already walked (a loop outside the dataset): those are a DataError naming the link."""
    inside = os.path.realpath(dataset if dataset is not None else folder)
    seen = {os.path.realpath(folder)}
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            link = os.path.join(dirpath, d)
            if os.path.islink(link):
                _check_dir_link(link, inside, seen)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f)]
    return files


def _check_dir_link(link: str, dataset: str, seen: set[str]) -> None:
    target = os.path.realpath(link)
    if os.path.commonpath([target, dataset]) in (dataset, target):  # inside the dataset, or an ancestor of it
        raise DataError(
            f"folder symlink {link} -> {target} points back into the data folder {dataset}: its images would be "
            "indexed twice or under another class; remove the link or point it outside the data folder"
        )
    if target in seen:
        raise DataError(f"folder symlink {link} -> {target} loops (that folder is already indexed); remove the link")
    seen.add(target)


def scan_folder(root: Path, *, dataset: Path | None = None) -> dict[str, list[str]]:
    """Map class name -> sorted image paths for a folder of class folders (`dataset`: the data folder `root` is
    part of, which folder symlinks must not point into; default `root`)."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    inside = os.path.realpath(dataset if dataset is not None else root)
    classes: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.is_symlink():  # a class folder that is a link: to outside the dataset only
            _check_dir_link(entry.path, inside, set())
        files = list_images(entry.path, dataset=inside)
        if not files:
            raise DataError(f"class folder has no images: {entry.path}")
        classes[entry.name] = files
    if not classes:
        raise DataError(f"no class folders with images in {root}")
    return classes


def read_file_list(path: Path) -> list[tuple[str, str]]:
    """CSV rows `path,label` (label is a class name or an integer); relative paths are relative to the CSV file."""
    if not path.is_file():
        raise DataError(f"file list not found: {path}")
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (i == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{i}: expected path,label, got {row!r}")
            p = Path(row[0].strip())
            p = p if p.is_absolute() else path.parent / p
            if not p.is_file():
                raise DataError(f"{path}:{i}: image not found: {p}")
            rows.append((str(p), row[1].strip()))
    if not rows:
        raise DataError(f"file list is empty: {path}")
    return rows


def _label_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def index_from_config(cfg: DataConfig, *, seed: int = 0) -> DatasetIndex:
    """Build the class index and train/val samples from `data.root` or `data.train_list`/`data.val_list`."""
    if cfg.train_list:
        return _index_from_lists(cfg, seed)
    if not cfg.root:
        raise DataError("no data given: set data.root (an image folder) or data.train_list (a CSV file list)")
    return _index_from_folder(Path(cfg.root).expanduser(), cfg, seed)


def _index_from_lists(cfg: DataConfig, seed: int) -> DatasetIndex:
    """CSV file lists: classes are the train list's labels (integers in numeric order, then names sorted)."""
    train_rows = read_file_list(Path(cfg.train_list).expanduser())
    val_rows = read_file_list(Path(cfg.val_list).expanduser()) if cfg.val_list else []
    classes = sorted({lbl for _, lbl in train_rows}, key=_label_sort_key)
    idx = {c: i for i, c in enumerate(classes)}
    unknown = [lbl for _, lbl in val_rows if lbl not in idx]
    if unknown:
        raise DataError(f"{cfg.val_list}: label {unknown[0]!r} does not occur in {cfg.train_list}")
    index = DatasetIndex(classes, [(p, idx[lbl]) for p, lbl in train_rows], [(p, idx[lbl]) for p, lbl in val_rows])
    if not val_rows:
        index = _split(index.classes, _group(index.train), cfg.val_fraction, seed)
    return index


def _index_from_folder(root: Path, cfg: DataConfig, seed: int) -> DatasetIndex:
    """An image folder: root/train (+ root/val) class folders, or class folders split by `data.val_fraction`."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    train_dir, val_dir = root / cfg.train_dir, root / cfg.val_dir
    if not train_dir.is_dir():
        folders = scan_folder(root)
        classes = list(folders)
        return _split(classes, {i: folders[c] for i, c in enumerate(classes)}, cfg.val_fraction, seed)
    train = scan_folder(train_dir, dataset=root)
    classes = list(train)
    idx = {c: i for i, c in enumerate(classes)}
    if not val_dir.is_dir():
        return _split(classes, {idx[c]: files for c, files in train.items()}, cfg.val_fraction, seed)
    val = scan_folder(val_dir, dataset=root)
    extra = [c for c in val if c not in idx]
    if extra:
        raise DataError(f"class {extra[0]!r} is in {val_dir} but not in {train_dir}")
    val_samples = [(p, idx[c]) for c, files in val.items() for p in files]
    return DatasetIndex(classes, [(p, idx[c]) for c, files in train.items() for p in files], val_samples)


def index_for_eval(root: Path, classes: list[str]) -> list[Sample]:
    """Samples of a folder to evaluate against a trained class list (`fastft eval --data D`)."""
    folders = scan_folder(root)
    idx = {c: i for i, c in enumerate(classes)}
    extra = [c for c in folders if c not in idx]
    if extra:
        raise DataError(f"class {extra[0]!r} in {root} is not one of the model's {len(classes)} classes")
    return [(p, idx[c]) for c, files in folders.items() for p in files]


def _group(samples: list[Sample]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for p, y in samples:
        out.setdefault(y, []).append(p)
    return out


def _split(classes: list[str], by_class: dict[int, list[str]], fraction: float, seed: int) -> DatasetIndex:
    """Seeded stratified split: each class keeps round(n * fraction) images for val (at least 1 when n >= 2)."""
    rng = random.Random(seed)
    train, val = [], []
    for y in sorted(by_class):
        files = sorted(by_class[y])
        rng.shuffle(files)
        n_val = min(len(files) - 1, max(1, round(len(files) * fraction))) if len(files) >= 2 else 0
        val += [(p, y) for p in sorted(files[:n_val])]
        train += [(p, y) for p in sorted(files[n_val:])]
    return DatasetIndex(classes, train, val)
