"""Text data: reader errors (file:line), class rules, the token cache key, length bucketing + dynamic padding, and
rank dealing (computed per rank without a process group)."""

from __future__ import annotations

import csv
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from tiny_bert import tiny_bert, tokenizer_maker  # noqa: F401  (fixtures used by name)

from fastft.backbones.base import TextSpec
from fastft.config import DataConfig
from fastft.errors import DataError

WORDS = "the a cat dog is was very not good bad movie film plot music food and but it this".split()


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def rows_of_varied_length(n: int, *, classes=("neg", "pos"), seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=rng.randint(1, 20))), classes[i % len(classes)]) for i in range(n)]


# --------------------------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize(
    ("name", "content", "line", "message"),
    [
        ("a.csv", b"text,label\ngood film,pos\nonly text\n", 3, "missing column 'label'"),
        ("b.csv", b"text,label\n   ,pos\n", 2, "empty text"),
        ("c.csv", b'text,label\n"two\nlines",pos\nok,\n', 4, "label must be a non-empty string"),
        ("d.csv", b"sentence,label\nx,y\n", 1, "expected a header naming the columns text,label"),
        ("e.csv", b"text,label\nok,pos\nbad \xff byte,neg\n", 3, "not UTF-8 text (byte 0xff)"),
        ("f.jsonl", b'{"text": "a", "label": "x"}\n\n{"text": "b",\n', 3, "bad JSON"),
        ("g.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b"}\n', 2, "missing column 'label'"),
        ("h.jsonl", b'{"text": "a", "label": 1}\n{"text": "", "label": 2}\n', 2, "empty text"),
        ("i.jsonl", b'{"text": "a", "label": 1}\n["b", 2]\n', 2, "expected an object with text and label"),
    ],
)
def test_a_bad_row_is_one_line_naming_file_and_line(tmp_path, name, content, line, message) -> None:
    from fastft.data.text import read_text_file

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        read_text_file(path)
    text = str(e.value)
    assert text.startswith(f"{path}:{line}: ") and message in text and "\n" not in text


def test_reading_csv_and_jsonl(tmp_path) -> None:
    from fastft.data.text import read_text_file

    # Quoted commas and newlines, extra columns, a BOM, blank lines; a record's line is where it starts.
    p = tmp_path / "t.csv"
    p.write_bytes(b'\xef\xbb\xbfid,label,text\n1,pos,"good, very good"\n\n2,neg,"bad\nplot"\n3,pos,fine\n')
    f = read_text_file(p)
    assert (f.texts, f.labels, f.lines) == (["good, very good", "bad\nplot", "fine"], ["pos", "neg", "pos"], [2, 4, 6])
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "a\u2028b", "label": 3}\n\n{"label": "x", "text": "c"}\n')
    f = read_text_file(j)
    assert (f.texts, f.labels, f.lines) == (["a\u2028b", "c"], ["3", "x"], [1, 3])
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(DataError, match=r"\.csv or \.jsonl"):
        read_text_file(tmp_path / "t.txt")


def test_classes_are_sorted_and_an_unknown_val_label_names_its_line(tmp_path) -> None:
    from fastft.data.text import index_text

    train = write_csv(tmp_path / "train.csv", [("x", "b"), ("y", "10"), ("z", "a"), ("w", "2"), ("v", "a")])
    val = write_csv(tmp_path / "val.csv", [("x", "a"), ("y", "10")])
    index = index_text(DataConfig(train_list=str(train), val_list=str(val)))
    assert index.classes == ["2", "10", "a", "b"]  # integers numerically, then names: the image file-list rule
    assert index.train.labels == [3, 1, 2, 0, 2] and index.val.labels == [2, 1]
    bad = write_csv(tmp_path / "bad.csv", [("x", "a"), ("y", "c")])
    with pytest.raises(DataError, match=f"^{bad}:3: label 'c' does not occur in {train}$"):
        index_text(DataConfig(train_list=str(train), val_list=str(bad)))
    with pytest.raises(DataError, match=r"set data\.train_list"):
        index_text(DataConfig())


def test_one_file_is_split_by_val_fraction_seeded_and_stratified(tmp_path) -> None:
    from fastft.data.text import index_text

    rows = [(f"row {i}", c) for c in ("a", "b", "c") for i in range(10)] + [("single", "d")]
    path = write_csv(tmp_path / "all.csv", rows)
    cfg = DataConfig(train_list=str(path), val_fraction=0.2)
    index = index_text(cfg, seed=1)
    val_per_class = [index.val.labels.count(y) for y in range(4)]
    assert val_per_class == [2, 2, 2, 0]  # round(10 * 0.2) per class; a one-row class stays in train
    assert sorted(index.train.rows + index.val.rows) == list(range(31))
    assert all(rows[r][1] == index.classes[y] for r, y in zip(index.val.rows, index.val.labels))
    assert index_text(cfg, seed=1).val.rows == index.val.rows
    assert index_text(cfg, seed=2).val.rows != index.val.rows


# --------------------------------------------------------------------------------------------------------------------
# Token cache


def test_tokens_are_cached_under_a_key_of_tokenizer_length_and_data(
    tiny_bert, tokenizer_maker, tmp_path, caplog
) -> None:
    from transformers import AutoTokenizer

    from fastft.data.text import read_text_file
    from fastft.data.text_tokens import tokenize_file

    data = write_csv(tmp_path / "d.csv", [("the cat is good", "a"), (" ".join(["dog"] * 40), "b")])
    spec, cache = TextSpec(str(tiny_bert), 12), tmp_path / "cache"
    first = tokenize_file(read_text_file(data), spec, cache_dir=cache)
    expected = AutoTokenizer.from_pretrained(tiny_bert)(["the cat is good", " ".join(["dog"] * 40)])["input_ids"]
    assert first.source == "built" and first.lengths == [6, 12]  # [CLS] 4 words [SEP]; the long row truncated to 12
    assert first.row(0).tolist() == expected[0] and first.row(1).tolist() == [*expected[1][:11], expected[1][-1]]
    assert first.pad_id == 0 and len(list(cache.glob("*.safetensors"))) == 1
    again = tokenize_file(read_text_file(data), spec, cache_dir=cache)
    assert again.source == "disk" and torch.equal(again.ids, first.ids) and torch.equal(again.offsets, first.offsets)
    # Each part of the key: max_length, the data file's bytes, the tokenizer's files.
    assert tokenize_file(read_text_file(data), TextSpec(str(tiny_bert), 8), cache_dir=cache).source == "built"
    write_csv(data, [("the cat is good", "a"), ("a dog", "b")])
    changed = tokenize_file(read_text_file(data), spec, cache_dir=cache)
    assert changed.source == "built" and changed.lengths == [6, 4]
    other = tmp_path / "other_tok"
    shutil.copytree(tiny_bert, other)
    tokenizer_maker(other, words=["dog", "cat"])
    assert tokenize_file(read_text_file(data), TextSpec(str(other), 12), cache_dir=cache).source == "built"
    assert len(list(cache.glob("*.safetensors"))) == 4
    # A truncated cache file is rebuilt, said once.
    key_file = max(cache.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    key_file.write_bytes(key_file.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="fastft"):
        rebuilt = tokenize_file(read_text_file(data), TextSpec(str(other), 12), cache_dir=cache)
    assert rebuilt.source == "built" and "unreadable" in caplog.text
    assert tokenize_file(read_text_file(data), TextSpec(str(other), 12), cache_dir=cache).source == "disk"


# --------------------------------------------------------------------------------------------------------------------
# Batches


def _loader(n: int, *, train: bool, batch_size: int, rank=0, world=1, seed=0, lengths=None):
    from fastft.data.text import TextSplit
    from fastft.data.text_loader import TextLoader
    from fastft.data.text_tokens import Tokens

    rng = random.Random(5)
    lengths = lengths or [rng.randint(3, 40) for _ in range(n)]
    ids = torch.cat([torch.arange(1, k + 1, dtype=torch.int32) for k in lengths])  # row r holds 1..len(r)
    offsets = torch.cumsum(torch.tensor([0, *lengths]), 0)
    split = TextSplit(None, list(range(n)), [r % 3 for r in range(n)])
    return TextLoader(
        split, Tokens(ids, offsets, 0, "built"), train=train, batch_size=batch_size, seed=seed, rank=rank, world=world
    ), lengths


def test_batches_are_length_bucketed_and_padded_to_their_longest_row() -> None:
    loader, lengths = _loader(60, train=True, batch_size=4)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(loader) == len(batches) == 15
    padded = 0
    for batch, labels in batches:
        rows = batch["index"].tolist()
        longest = max(lengths[r] for r in rows)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, longest)
        assert batch["attention_mask"].sum(1).tolist() == [lengths[r] for r in rows]
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()  # padding is pad_id
        assert labels.tolist() == [r % 3 for r in rows]
        padded += int((batch["attention_mask"] == 0).sum())
    # Against the same rows in plain permutation order: bucketing cuts the padding by a large factor.
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0)).tolist()
    unsorted = sum(
        4 * max(lengths[r] for r in perm[j : j + 4]) - sum(lengths[r] for r in perm[j : j + 4]) for j in range(0, 60, 4)
    )
    assert padded * 3 < unsorted
    assert sorted(r for b, _ in batches for r in b["index"].tolist()) == list(range(60))


def test_bucketed_order_is_deterministic_in_seed_and_epoch_and_resumes_mid_epoch() -> None:
    def order(seed, epoch, start=0):
        loader, _ = _loader(64, train=True, batch_size=4, seed=seed)
        loader.set_epoch(epoch, start)
        return [b["index"].tolist() for b, _ in loader]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert order(0, 1, start=5) == order(0, 1)[5:]


def test_two_ranks_train_on_the_global_batches_of_one_process() -> None:
    one, _ = _loader(50, train=True, batch_size=8)
    ranks = [_loader(50, train=True, batch_size=4, rank=r, world=2)[0] for r in (0, 1)]
    for loader in (one, *ranks):
        loader.set_epoch(3)
    steps = [[b["index"].tolist() for b, _ in loader] for loader in (one, *ranks)]
    assert len(steps[0]) == len(steps[1]) == len(steps[2]) == 6  # 50 // 8: the ragged rest is dropped on every rank
    for g, a, b in zip(*steps):
        assert sorted(a + b) == sorted(g) and len(a) == len(b) == 4


def test_evaluation_deals_every_row_exactly_once_over_uneven_ranks() -> None:
    seen, per_rank = [], []
    for rank in (0, 1):
        loader, lengths = _loader(101, train=False, batch_size=8, rank=rank, world=2)
        loader.set_epoch(0)
        rows = []
        for batch, labels in loader:
            assert batch["input_ids"].shape[0] <= 8
            assert batch["input_ids"].shape[1] == max(lengths[r] for r in batch["index"].tolist())
            assert labels.tolist() == [r % 3 for r in batch["index"].tolist()]
            rows += batch["index"].tolist()
        assert len(loader) == -(-len(rows) // 8) and loader.num_samples == len(rows)
        per_rank.append(len(rows))
        seen += rows
    assert per_rank == [50, 51] and sorted(seen) == list(range(101))


def test_data_max_length_is_a_checked_config_key() -> None:
    from fastft.config import FinetuneConfig
    from fastft.errors import ConfigError

    assert FinetuneConfig().data.max_length == 128
    cfg = FinetuneConfig()
    cfg.data.max_length = 0
    with pytest.raises(ConfigError, match=r"data\.max_length"):
        cfg.validate()


def test_jsonl_with_integer_labels_indexes_like_csv(tmp_path) -> None:
    from fastft.data.text import index_text

    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 3}) for i in range(12)))
    index = index_text(DataConfig(train_list=str(p), val_fraction=0.25), seed=0)
    assert index.classes == ["0", "1", "2"] and [index.val.labels.count(y) for y in range(3)] == [1, 1, 1]
