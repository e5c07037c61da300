"""Every figure of the streamed evaluation report equals scikit-learn's on the same predictions.

Tolerances: ABS_TOL = 1e-6 for every rate (accuracy, precision/recall/F1, AUROC, AP), which are computed from
integer counts; LOSS_TOL = 1e-6 relative for the mean cross-entropy, which torch accumulates in float32 while
sklearn's log_loss works in float64. Counts (confusion matrix, support, num_samples) must match exactly.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)
from torch import nn

from fastft.evaluation import StreamingEvaluator, run_evaluation
from fastft.precision import Precision

ABS_TOL = 1e-6
LOSS_TOL = 1e-6
CPU = torch.device("cpu")
FP32 = Precision(torch.float32, "cpu")

# Uneven batch sizes, including an empty batch (must be ignored) and a batch of one.
BATCH_SIZES = [37, 0, 5, 64, 1, 23]


def _random_batches(num_classes: int, *, absent: int | None = None, seed: int = 0):
    """Random logits/labels split into BATCH_SIZES; class `absent` is never a label nor an argmax."""
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([c for c in range(num_classes) if c != absent])
    # imbalanced classes, so that macro and weighted averages differ
    class_weights = torch.linspace(1.0, 3.0, len(present))
    batches = []
    for n in BATCH_SIZES:
        logits = torch.randn(n, num_classes, generator=g) * 2.0
        labels = present[torch.multinomial(class_weights, n, replacement=True, generator=g)] if n else present[:0]
        if absent is not None:
            logits[:, absent] = -20.0  # never the argmax, yet a finite, tiny probability
        # make the true class more likely so the metrics are neither near chance nor perfect
        logits[torch.arange(n), labels] += 2.5
        batches.append((logits, labels))
    return batches


def _expected(num_classes: int, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The report figures computed by scikit-learn from the concatenated predictions."""
    c = num_classes
    y = labels.numpy()
    # the same float32 softmax as the evaluator, so AUROC/AP see identical scores (ties included)
    probs32 = logits.float().softmax(dim=1)
    pred = probs32.argmax(dim=1).numpy()
    exp: dict = {
        "top1": accuracy_score(y, pred),
        "confusion_matrix": confusion_matrix(y, pred, labels=list(range(c))).tolist(),
        # log_loss in float64 on float64 probabilities: the reference mean cross-entropy
        "loss": log_loss(y, logits.double().softmax(dim=1).numpy(), labels=list(range(c))),
        "num_samples": len(y),
    }
    if c >= 5:
        exp["top5"] = top_k_accuracy_score(y, probs32.numpy(), k=5, labels=list(range(c)))
    # sklearn's default labels=None uses the sorted union of classes seen in y_true or y_pred: a class that is
    # neither a label nor a prediction is left out of the macro/weighted averages. torchmetrics does the same:
    # for average="macro" it zeroes the weight of classes with tp + fp + fn == 0, and "weighted" weighs by
    # support (0 for such a class). zero_division=0 only silences sklearn's warning: 0/0 counts as 0 in both.
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        exp[f"precision_{avg}"], exp[f"recall_{avg}"], exp[f"f1_{avg}"] = p, r, f
    seen = np.union1d(y, pred)  # the labels sklearn reports per class with labels=None
    p, r, f, s = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    assert len(p) == len(seen)
    rows = [{"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for _ in range(c)]
    for i, cls in enumerate(seen):
        rows[cls] = {"precision": p[i], "recall": r[i], "f1": f[i], "support": int(s[i])}
    exp["per_class"] = rows
    if c == 2:
        exp["auroc"] = roc_auc_score(y, probs32[:, 1].numpy())
        exp["average_precision"] = average_precision_score(y, probs32[:, 1].numpy())
    return exp


def _assert_report_matches(report: dict, exp: dict, num_classes: int) -> None:
    assert report["num_samples"] == exp["num_samples"]
    assert report["confusion_matrix"] == exp["confusion_matrix"]
    assert report["loss"] == pytest.approx(exp["loss"], rel=LOSS_TOL)
    rate_keys = ["top1"] + [f"{m}_{a}" for m in ("precision", "recall", "f1") for a in ("macro", "micro", "weighted")]
    if num_classes >= 5:
        rate_keys.append("top5")
    else:
        assert "top5" not in report
    if num_classes == 2:
        rate_keys += ["auroc", "average_precision"]
    else:
        assert "auroc" not in report and "average_precision" not in report
    for key in rate_keys:
        assert report[key] == pytest.approx(exp[key], abs=ABS_TOL), key
    assert len(report["per_class"]) == num_classes
    for got, want in zip(report["per_class"], exp["per_class"]):
        assert got["support"] == want["support"]
        for key in ("precision", "recall", "f1"):
            assert got[key] == pytest.approx(want[key], abs=ABS_TOL)


@pytest.mark.parametrize(
    ("num_classes", "absent"),
    [(7, 4), (10, None), (2, None)],
    ids=["7-classes-one-absent", "10-classes", "binary"],
)
def test_streamed_report_equals_sklearn(num_classes, absent):
    batches = _random_batches(num_classes, absent=absent, seed=num_classes)
    ev = StreamingEvaluator(num_classes, CPU)
    for logits, labels in batches:
        ev.update(logits, labels)
    report = ev.compute()

    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    exp = _expected(num_classes, logits, labels)
    assert exp["num_samples"] == sum(BATCH_SIZES)
    if absent is not None:
        # the scenario really has an unseen class: no label, no prediction, and the row is all zeros
        assert exp["per_class"][absent]["support"] == 0
        assert all(row[absent] == 0 for row in exp["confusion_matrix"])
        assert report["per_class"][absent] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # sanity: the predictions are neither perfect nor all one class, so the averages really differ
    assert 0.2 < exp["top1"] < 0.95
    assert exp["f1_macro"] != pytest.approx(exp["f1_weighted"], abs=1e-3)
    _assert_report_matches(report, exp, num_classes)


def test_empty_batch_is_ignored_and_batching_does_not_change_the_report():
    batches = _random_batches(7, absent=4, seed=3)
    streamed = StreamingEvaluator(7, CPU)
    for logits, labels in batches:
        streamed.update(logits, labels)
    streamed.update(torch.empty(0, 7), torch.empty(0, dtype=torch.long))
    whole = StreamingEvaluator(7, CPU)
    whole.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    a, b = streamed.compute(), whole.compute()
    assert a["num_samples"] == b["num_samples"] == sum(BATCH_SIZES)
    assert a["confusion_matrix"] == b["confusion_matrix"]
    # the loss is a sample-weighted mean of per-batch means: equal to the one-batch mean, not the mean of means
    assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_TOL)
    assert a["f1_macro"] == pytest.approx(b["f1_macro"], abs=ABS_TOL)


def test_reset_forgets_previous_updates():
    (logits, labels), *_ = _random_batches(10, seed=5)
    ev = StreamingEvaluator(10, CPU)
    ev.update(-logits, labels)  # mostly wrong predictions, forgotten by reset
    ev.reset()
    ev.update(logits, labels)
    exp = _expected(10, logits, labels)
    _assert_report_matches(ev.compute(), exp, 10)


def test_top5_is_not_merged_with_top1_when_the_first_batch_scores_the_same():
    logits = torch.arange(10.0).flip(0)[None]  # ranking 0 > 1 > ... > 9
    ev = StreamingEvaluator(10, CPU)
    ev.update(logits, torch.tensor([0]))  # top-1 and top-5 correct: equal top1/top5 states after the first update
    ev.update(logits, torch.tensor([1]))  # top-1 wrong, top-5 correct
    report = ev.compute()
    assert report["top1"] == pytest.approx(0.5)
    assert report["top5"] == pytest.approx(1.0)  # the bug reports 0.5


def test_top5_differs_from_top1_when_the_first_batch_scores_differ():
    # the same two samples in the other order: the first update already separates top1 from top5
    logits = torch.arange(10.0).flip(0)[None]
    ev = StreamingEvaluator(10, CPU)
    ev.update(logits, torch.tensor([1]))
    ev.update(logits, torch.tensor([0]))
    report = ev.compute()
    assert (report["top1"], report["top5"]) == (pytest.approx(0.5), pytest.approx(1.0))


def test_four_classes_have_no_top5():
    (logits, labels), *_ = _random_batches(4, seed=1)
    ev = StreamingEvaluator(4, CPU)
    ev.update(logits, labels)
    report = ev.compute()
    assert "top5" not in report
    _assert_report_matches(report, _expected(4, logits, labels), 4)


# --------------------------------------------------------------------------------------------------------------------
# run_evaluation


class _Recorder(nn.Module):
    """A fixed linear classifier over flattened images that records the batch sizes it is called with."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(in_features, num_classes)
        with torch.no_grad():
            self.fc.bias.zero_()
            self.fc.bias[0] = 5.0  # zero padding images would all be predicted as class 0
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return self.fc(x.flatten(1))


def _loader(num_classes: int, sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        images = torch.randn(n, 3, 4, 4, generator=g)
        labels = torch.randint(1, num_classes, (n,), generator=g)  # never class 0: padding would show up there
        out.append((images, labels))
    return out


def test_padding_gives_the_same_report_and_never_reaches_the_metrics():
    c, bs = 6, 16
    loader = _loader(c, [bs, bs, 0, bs, 5])
    real = sum(len(lab) for _, lab in loader)
    plain_model, padded_model = _Recorder(48, c), _Recorder(48, c)
    plain = run_evaluation(plain_model, loader, num_classes=c, device=CPU, precision=FP32)
    padded = run_evaluation(padded_model, loader, num_classes=c, device=CPU, precision=FP32, pad_to=bs)

    # the padded run really padded: the short batch went through the model at full size; the empty one never ran
    assert plain_model.seen == [bs, bs, bs, 5]
    assert padded_model.seen == [bs, bs, bs, bs]
    # ...but only the real samples were counted
    assert padded["num_samples"] == plain["num_samples"] == real == 53
    assert padded["confusion_matrix"] == plain["confusion_matrix"]
    assert sum(row["support"] for row in padded["per_class"]) == real
    # no real label is class 0 while the model predicts class 0 for an all-zero (padding) image: counted padding
    # would show up as class-0 support or extra predictions in column 0
    assert padded["per_class"][0]["support"] == 0
    assert sum(row[0] for row in padded["confusion_matrix"]) == sum(row[0] for row in plain["confusion_matrix"])
    for key in ("top1", "top5", "loss", "f1_macro", "precision_weighted", "recall_micro"):
        assert padded[key] == pytest.approx(plain[key], abs=ABS_TOL), key

    # and both equal sklearn on the model's predictions for the real samples only
    model = _Recorder(48, c)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in loader])
    labels = torch.cat([lab for _, lab in loader])
    _assert_report_matches(padded, _expected(c, logits, labels), c)


def test_class_names_are_attached_to_per_class_rows():
    c = 3
    names = ["cat", "dog", "emu"]
    report = run_evaluation(
        _Recorder(48, c), _loader(c, [8, 3]), num_classes=c, device=CPU, precision=FP32, classes=names
    )
    assert report["classes"] == names
    assert [row["class"] for row in report["per_class"]] == names
    # the names label the rows in class-index order: supports match the label counts per index
    labels = torch.cat([lab for _, lab in _loader(c, [8, 3])])
    assert [row["support"] for row in report["per_class"]] == torch.bincount(labels, minlength=c).tolist()


def test_without_class_names_rows_have_no_class_key():
    report = run_evaluation(_Recorder(48, 3), _loader(3, [4]), num_classes=3, device=CPU, precision=FP32)
    assert "classes" not in report
    assert all("class" not in row for row in report["per_class"])


@pytest.mark.parametrize("classes", [2, 4, 5])
def test_report_keys_are_the_scalar_keys_of_the_metrics_built(classes) -> None:
    """report_keys is written out (so the check before the first step needs no torchmetrics import); it must stay the
    list the metrics give."""
    from fastft.evaluation import build_metrics, report_keys

    collection, extra = build_metrics(classes, torch.device("cpu"))
    built = [k for k in collection.keys() if not k.endswith("_per_class") and k != "confusion_matrix"] + list(extra)
    assert report_keys(classes) == built


def test_the_best_metric_check_imports_no_torchmetrics() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import fastft.trainer; from fastft.preflight import check_best_metric; "
        "check_best_metric('f1_macro', 4); print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchmetrics'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
