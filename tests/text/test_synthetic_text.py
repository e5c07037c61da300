"""The synthetic text set: deterministic in its seed, balanced, readable by the text reader, labelled by its rule
(the last clause's verdict, negation included), and not solved by a bag of words."""

from __future__ import annotations

import csv
import re

import pytest

from fastft.config import DataConfig
from fastft.errors import DataError


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def _last_verdict_is_positive(text: str) -> bool:
    from fastft.data.synthetic_text import POSITIVE

    negated, adjective = re.findall(r"was (not )?(\w+)", text)[-1]
    return (adjective in POSITIVE) != bool(negated)


def test_deterministic_balanced_and_readable(tmp_path) -> None:
    from fastft.data.synthetic_text import write_text_dataset
    from fastft.data.text import index_text

    train, val = write_text_dataset(tmp_path / "a", num_classes=6, train_rows=120, val_rows=30, seed=3)
    again, _ = write_text_dataset(tmp_path / "b", num_classes=6, train_rows=120, val_rows=30, seed=3)
    other, _ = write_text_dataset(tmp_path / "c", num_classes=6, train_rows=120, val_rows=30, seed=4)
    assert train.read_bytes() == again.read_bytes() and train.read_bytes() != other.read_bytes()
    index = index_text(DataConfig(train_list=str(train), val_list=str(val)))
    assert index.classes == ["film_neg", "film_pos", "food_neg", "food_pos", "hotel_neg", "hotel_pos"]
    assert (len(index.train), len(index.val)) == (120, 30)
    counts = [index.train.labels.count(y) for y in range(6)]
    assert all(14 <= c <= 26 for c in counts)  # 20 each, give or take the 3 % flipped labels
    with pytest.raises(DataError, match="num_classes must be even"):
        write_text_dataset(tmp_path / "d", num_classes=3)


def test_labels_follow_the_last_clause_and_a_bag_of_words_falls_short(tmp_path) -> None:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    from fastft.data.synthetic_text import write_text_dataset

    train, val = write_text_dataset(tmp_path, num_classes=4, train_rows=1200, val_rows=400, seed=0)
    rows = _rows(train) + _rows(val)
    agree = sum(_last_verdict_is_positive(t) == (y.endswith("_pos")) for t, y in rows) / len(rows)
    assert 0.95 < agree < 1.0  # the rule decides, apart from the few flipped labels
    (xt, yt), (xv, yv) = zip(*_rows(train)), zip(*_rows(val))
    words = CountVectorizer()
    clf = LogisticRegression(max_iter=2000).fit(words.fit_transform(xt), yt)
    accuracy = clf.score(words.transform(xv), yv)
    topic = sum(p.split("_")[0] == y.split("_")[0] for p, y in zip(clf.predict(words.transform(xv)), yv)) / len(yv)
    assert topic > 0.9  # the topic is in the words ...
    assert 0.3 < accuracy < 0.75  # ... the verdict is not (4 classes: chance 0.25, the rule ~0.97)
