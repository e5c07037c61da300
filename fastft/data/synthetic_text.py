"""A procedurally generated text-classification set (demo, tests, benchmarks), deterministic in its seed.

Classes are topic x sentiment ("food_pos", "food_neg", "film_pos", ...). A sentence names its topic with one of
several synonyms and gives its verdict in its last clause; what makes it more than a bag of words:
- negation: "was not awful" is positive, so a sentiment word alone does not decide;
- contrast: half the sentences open with a clause of the opposite verdict ("the X was great but the Y was bland"),
  so both polarities' words occur and only their order tells which one counts;
- distractors shared by every class (fillers, another topic's nouns in asides) and a small rate of flipped labels.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from fastft.errors import DataError

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    # topic: (nouns naming it, aspects of it)
    "food": (["meal", "dinner", "dish", "lunch"], ["taste", "sauce", "portion", "menu"]),
    "film": (["movie", "film", "picture", "show"], ["plot", "acting", "ending", "soundtrack"]),
    "hotel": (["hotel", "room", "stay", "resort"], ["bed", "staff", "view", "breakfast"]),
    "phone": (["phone", "device", "handset", "gadget"], ["battery", "screen", "camera", "charger"]),
}
POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "pleasant", "fantastic", "good"]
NEGATIVE = ["awful", "terrible", "bland", "poor", "dreadful", "disappointing", "bad", "mediocre"]
FILLERS = ["honestly", "overall", "i think", "to be fair", "my friend said", "as expected", "last week", "frankly"]
ASIDES = ["after the {}", "before the {}", "unlike the {} we had", "while waiting for the {}"]
NOISE = 0.03  # flipped labels: no model reaches 100 %


def class_names(num_classes: int) -> list[str]:
    """`num_classes` (an even number from 2 to 2 x the topics) class names: each topic's positive and negative."""
    if num_classes % 2 or not 2 <= num_classes <= 2 * len(TOPICS):
        raise DataError(f"synthetic text: num_classes must be even, 2..{2 * len(TOPICS)}, got {num_classes}")
    return [f"{t}_{s}" for t in list(TOPICS)[: num_classes // 2] for s in ("pos", "neg")]


def _verdict(rng: random.Random, positive: bool) -> str:
    """'was ADJ' or 'was not ADJ' meaning `positive`."""
    negated = rng.random() < 0.35
    words = NEGATIVE if positive == negated else POSITIVE
    return f"{'was not' if negated else 'was'} {rng.choice(words)}"


def make_sentence(rng: random.Random, topic: str, positive: bool) -> str:
    nouns, aspects = TOPICS[topic]
    main = f"the {rng.choice(aspects + nouns)} {_verdict(rng, positive)}"
    if rng.random() < 0.5:  # an opening clause with the opposite verdict: only the order says which counts
        main = f"the {rng.choice(aspects)} {_verdict(rng, not positive)} but {main}"
    parts = [main]
    if rng.random() < 0.6:
        parts.insert(0, rng.choice(FILLERS))
    if rng.random() < 0.4:  # another topic's noun, shared across classes
        other = rng.choice([t for t in TOPICS if t != topic])
        parts.append(rng.choice(ASIDES).format(rng.choice(TOPICS[other][0])))
    return " ".join(parts)


def make_rows(n: int, classes: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """`n` rows, classes in turn (balanced), each with probability NOISE labelled with another class."""
    rows = []
    for i in range(n):
        name = classes[i % len(classes)]
        topic, sentiment = name.rsplit("_", 1)
        text = make_sentence(rng, topic, sentiment == "pos")
        if rng.random() < NOISE:
            name = rng.choice([c for c in classes if c != name])
        rows.append((text, name))
    rng.shuffle(rows)
    return rows


def write_text_dataset(
    folder: str | Path, *, num_classes: int = 4, train_rows: int = 800, val_rows: int = 200, seed: int = 0
) -> tuple[Path, Path]:
    """Write folder/train.csv and folder/val.csv (columns text,label); the same seed writes the same bytes.

    Returns:
        (train.csv, val.csv), for data.train_list and data.val_list.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = class_names(num_classes)
    rng = random.Random(seed)
    paths = []
    for split, n in (("train", train_rows), ("val", val_rows)):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["text", "label"])
            w.writerows(make_rows(n, classes, rng))
        paths.append(path)
    return paths[0], paths[1]
