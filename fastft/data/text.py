"""Text classification data: CSV/JSONL files of `text,label`, tokenised once into a cache, batched by length.

Behaviour:
- A `.csv` file has a header naming the columns `text` and `label` (any order, other columns ignored); a `.jsonl`
  file holds one object with "text" and "label" per line. Blank lines are skipped. A bad row (a missing column,
  empty text or label, bad JSON, bytes that are not UTF-8) is a one-line DataError naming the file and line.
- Classes are the sorted label names of the train file (integers numerically), as for image file lists; a val label
  unknown to train is an error naming the val file and line. Without a val file the train file is split by
  `data.val_fraction` with the image rule (seeded, stratified).
- text_tokens.py: each file is tokenised once (truncated to `data.max_length`, no padding) and stored as safetensors
  under a key over the tokenizer's files, max_length and the data file's bytes; a changed key or an unreadable cache
  is rebuilt.
- text_loader.py: training batches are the image sampler's seeded permutation of the global batch (batch_size x
  world), sorted by length within chunks of CHUNK_BATCHES global batches, cut into global batches dealt to the ranks,
  in an order shuffled by (seed, epoch): every rank runs the same steps and the union of one step's batches is the
  same as one process's with the global batch size. Evaluation: each rank's contiguous shard, sorted by length; every
  row once.
- Each batch is padded to its longest row (attention_mask marks the real tokens).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from fastft.config import DataConfig
from fastft.data.index import _label_sort_key, _split
from fastft.errors import DataError

# --------------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class TextFile:
    """The rows of one data file: texts, label names and the line each row starts on."""

    path: Path
    sha256: str
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None


def _add(out: TextFile, line: int, text: object, label: object) -> None:
    """Append one row; `label` None: a file read for prediction (no labels)."""
    if not isinstance(text, str):
        raise DataError(f"{out.path}:{line}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{out.path}:{line}: empty text")
    if label is None:
        out.texts.append(text)
        out.labels.append("")
        out.lines.append(line)
        return
    if isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
        raise DataError(f"{out.path}:{line}: label must be a non-empty string or an integer, got {label!r}")
    out.texts.append(text)
    out.labels.append(str(label).strip())
    out.lines.append(line)


def _read_csv(out: TextFile, text: str, columns: tuple[str, ...] = ("text", "label")) -> None:
    reader = csv.reader(io.StringIO(text, newline=""))
    header, cols = None, {}
    while True:
        line = reader.line_num + 1  # where the next record starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{out.path}:{line}: {e}") from None
        if not row or not any(c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip().lower() for c in row]
            cols = {c: header.index(c) for c in columns if c in header}
            if len(cols) < len(columns):
                want = ",".join(columns)
                raise DataError(f"{out.path}:{line}: expected a header naming the columns {want}, got {row!r}")
            continue
        missing = [c for c, i in cols.items() if i >= len(row)]
        if missing:
            raise DataError(f"{out.path}:{line}: missing column {missing[0]!r} ({len(row)} of {len(header)} fields)")
        _add(out, line, row[cols["text"]], row[cols["label"]] if "label" in cols else None)


def _read_jsonl(out: TextFile, text: str, columns: tuple[str, ...] = ("text", "label")) -> None:
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a JSON string
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{out.path}:{line}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            want = " and ".join(columns)
            raise DataError(f"{out.path}:{line}: expected an object with {want}, got {type(obj).__name__}")
        missing = [c for c in columns if c not in obj]
        if missing:
            raise DataError(f"{out.path}:{line}: missing column {missing[0]!r}")
        _add(out, line, obj["text"], obj["label"] if "label" in columns else None)


def _read_lines(out: TextFile, text: str) -> None:
    """A .txt file for prediction: one text per line, blank lines skipped."""
    for line, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        if raw.strip():
            _add(out, line, raw, None)


def read_text_file(path: Path, *, labels: bool = True) -> TextFile:
    """Read a `.csv` or `.jsonl` file of text,label rows (see the module docstring for the rules). `labels=False`
    reads texts to classify: a `text` column or key is enough (labels are ""), and a `.txt` file is one text per line.

    Raises:
        DataError: a missing file, an unknown extension, a bad row (naming file and line), or no rows at all.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"text file not found: {path}")
    kind = path.suffix.lower()
    columns = ("text", "label") if labels else ("text",)
    if kind not in (".csv", ".jsonl", ".ndjson") and (labels or kind != ".txt"):
        what = "a .csv or .jsonl file of text,label rows" if labels else "a .txt, .csv or .jsonl file of texts"
        raise DataError(f"{path}: text data must be {what}")
    data = path.read_bytes()
    out = TextFile(path, hashlib.sha256(data).hexdigest())
    text = _decode(path, data)
    if kind == ".txt":
        _read_lines(out, text)
    else:
        (_read_csv if kind == ".csv" else _read_jsonl)(out, text, columns)
    if not out.texts:
        raise DataError(f"{path}: no {','.join(columns)} rows")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Classes and splits


@dataclass
class TextSplit:
    """Rows `rows` of `file` with their class indices."""

    file: TextFile
    rows: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class TextIndex:
    classes: list[str]
    train: TextSplit
    val: TextSplit

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def index_text(cfg: DataConfig, *, seed: int = 0) -> TextIndex:
    """Classes and train/val rows from `data.train_list` (+ `data.val_list`, or a `data.val_fraction` split)."""
    if not cfg.train_list:
        raise DataError("no text data given: set data.train_list (a .csv or .jsonl file of text,label rows)")
    train = read_text_file(Path(cfg.train_list))
    classes = sorted(set(train.labels), key=_label_sort_key)
    idx = {c: i for i, c in enumerate(classes)}
    if cfg.val_list:
        val = read_text_file(Path(cfg.val_list))
        for lbl, line in zip(val.labels, val.lines):
            if lbl not in idx:
                raise DataError(f"{val.path}:{line}: label {lbl!r} does not occur in {train.path}")
        return TextIndex(
            classes,
            TextSplit(train, list(range(len(train))), [idx[c] for c in train.labels]),
            TextSplit(val, list(range(len(val))), [idx[c] for c in val.labels]),
        )
    # The image rule (folder._split) on row numbers: zero-padded so its sort is the numeric order.
    by_class: dict[int, list[str]] = {}
    for row, lbl in enumerate(train.labels):
        by_class.setdefault(idx[lbl], []).append(f"{row:012d}")
    split = _split(classes, by_class, cfg.val_fraction, seed)
    as_split = lambda samples: TextSplit(train, [int(r) for r, _ in samples], [y for _, y in samples])
    return TextIndex(classes, as_split(split.train), as_split(split.val))
