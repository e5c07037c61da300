"""Multi-label file lists (`data.task = "multilabel"`): a CSV with the header `path,labels` (labels separated by `;`,
an empty field = no positive label) or a JSONL of `{"path": ..., "labels": [...]}` rows.

Classes are the sorted union of the labels seen in the train list (integers in numeric order, then names sorted, as
for single-label lists). A sample's label is its multi-hot tuple (one 0/1 per class), so the loaders batch it as a
(B, C) float tensor. Every bad row is a one-line DataError naming the file and the row.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from fastft.config import DataConfig
from fastft.data.index import DatasetIndex, Sample, _label_sort_key
from fastft.errors import DataError

HEADER = ["path", "labels"]


def read_label_sets(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line number, image path, label names) rows of a `.csv` or `.jsonl` list; relative paths are relative to the
    list."""
    if not path.is_file():
        raise DataError(f"file list not found: {path}")
    rows = _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".json") else _read_csv(path)
    out = []
    for i, p, labels in rows:
        img = Path(p)
        img = img if img.is_absolute() else path.parent / img
        if not img.is_file():
            raise DataError(f"{path}:{i}: image not found: {img}")
        out.append((i, str(img), labels))
    if not out:
        raise DataError(f"file list is empty: {path}")
    return out


def _read_csv(path: Path) -> list[tuple[int, str, list[str]]]:
    rows, header = [], False
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#"):
                continue
            if not header:
                if [c.strip().lower() for c in row] != HEADER:
                    raise DataError(f"{path}:{i}: expected the header path,labels, got {','.join(row)!r}")
                header = True
                continue
            if len(row) != 2 or not row[0].strip():
                raise DataError(f"{path}:{i}: expected path,labels (labels separated by ';'), got {row!r}")
            field = row[1].strip()
            labels = [t.strip() for t in field.split(";")] if field else []
            if "" in labels:
                raise DataError(f"{path}:{i}: empty label in {field!r} (labels are separated by ';')")
            rows.append((i, row[0].strip(), labels))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, str, list[str]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{i}: not a JSON object ({e.msg})") from None
            ok = isinstance(obj, dict) and isinstance(obj.get("path"), str) and isinstance(obj.get("labels"), list)
            if not ok or not all(isinstance(x, str | int) and str(x).strip() for x in obj["labels"]):
                raise DataError(f'{path}:{i}: expected {{"path": "...", "labels": ["...", ...]}}, got {line.strip()!r}')
            rows.append((i, obj["path"], [str(x).strip() for x in obj["labels"]]))
    return rows


def multi_hot(labels: list[str], idx: dict[str, int]) -> tuple[int, ...]:
    hot = [0] * len(idx)
    for lbl in labels:
        hot[idx[lbl]] = 1
    return tuple(hot)


def samples_for(path: Path, classes: list[str]) -> list[Sample]:
    """The samples of a list whose labels must all be among `classes` (a val list, or `fastft eval` data)."""
    idx = {c: i for i, c in enumerate(classes)}
    rows = read_label_sets(path)
    for i, _, labels in rows:
        unknown = [lbl for lbl in labels if lbl not in idx]
        if unknown:
            raise DataError(f"{path}:{i}: label {unknown[0]!r} does not occur in the train labels ({len(idx)} classes)")
    return [(p, multi_hot(labels, idx)) for _, p, labels in rows]


def index_multilabel(cfg: DataConfig, *, seed: int = 0) -> DatasetIndex:
    """Classes from the train list's labels; val from `data.val_list`, else a seeded `data.val_fraction` split."""
    train_path = Path(cfg.train_list).expanduser()
    rows = read_label_sets(train_path)
    classes = sorted({lbl for _, _, labels in rows for lbl in labels}, key=_label_sort_key)
    if not classes:
        raise DataError(f"{train_path}: no labels at all (every row's labels field is empty)")
    idx = {c: i for i, c in enumerate(classes)}
    train = [(p, multi_hot(labels, idx)) for _, p, labels in rows]
    if cfg.val_list:
        return DatasetIndex(classes, train, samples_for(Path(cfg.val_list).expanduser(), classes))
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = min(len(train) - 1, max(1, round(len(train) * cfg.val_fraction))) if len(train) >= 2 else 0
    val_ids = set(order[:n_val])
    return DatasetIndex(
        classes, [s for i, s in enumerate(train) if i not in val_ids], [s for i, s in enumerate(train) if i in val_ids]
    )
