"""Streamed, exact evaluation: torchmetrics states updated every batch, synced across ranks once at compute time.

Each sample is counted exactly once whatever the world size: loaders shard evaluation data without padding
duplicates (or mask their padding), and a short or empty last batch is handled without NaN. When the model is
compiled, short image batches are padded to the full batch size and the padding is sliced off before the metrics;
text batches (dicts of token tensors, fastft/text_inputs.py) are never padded: their length varies batch to batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastft.precision import Precision


def build_metrics(num_classes: int, device: torch.device):
    """The metric collection for a `num_classes` task; top-5 when there are >= 5 classes, AUROC/AP when binary."""
    from torchmetrics import MeanMetric, MetricCollection
    from torchmetrics.classification import (
        BinaryAUROC,
        BinaryAveragePrecision,
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    c = num_classes
    metrics: dict[str, nn.Module] = {"top1": MulticlassAccuracy(c, top_k=1, average="micro")}
    if c >= 5:
        metrics["top5"] = MulticlassAccuracy(c, top_k=5, average="micro")
    for avg in ("macro", "micro", "weighted", "none"):
        suffix = "per_class" if avg == "none" else avg
        metrics[f"precision_{suffix}"] = MulticlassPrecision(c, average=avg)
        metrics[f"recall_{suffix}"] = MulticlassRecall(c, average=avg)
        metrics[f"f1_{suffix}"] = MulticlassF1Score(c, average=avg)
    metrics["confusion_matrix"] = MulticlassConfusionMatrix(c)
    # compute_groups=False: grouping merges metrics whose states match after the first batch, which can silently make
    # top-5 share top-1's state for the rest of the run.
    collection = MetricCollection(metrics, compute_groups=False)
    extra: dict[str, nn.Module] = {"loss": MeanMetric()}
    if c == 2:
        extra["auroc"] = BinaryAUROC()
        extra["average_precision"] = BinaryAveragePrecision()
    return collection.to(device), {k: m.to(device) for k, m in extra.items()}


def _pr_curve(device: torch.device):
    """A binary task's precision-recall curve. thresholds=None: every score is kept and gathered from all ranks at
    compute time (list states concatenated, as average precision's), so the curve is exact under any world size."""
    from torchmetrics.classification import BinaryPrecisionRecallCurve

    return BinaryPrecisionRecallCurve().to(device)


def report_keys(num_classes: int, *, task: str = "multiclass") -> list[str]:
    """The scalar keys of a `num_classes` report (what checkpoint.best_metric may name), in the order of the metrics
    :func:`build_metrics` builds. Written out rather than read off the metrics: it is checked before the first
    step, and importing torchmetrics there costs every rank seconds of start-up."""
    if task == "multilabel":
        return list(MULTILABEL_KEYS)
    names = ["top1"] + (["top5"] if num_classes >= 5 else [])
    names += [f"{m}_{avg}" for avg in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1")]
    # the collection lists its metrics sorted by name; loss and the binary metrics follow
    return sorted(names) + ["loss"] + (["auroc", "average_precision"] if num_classes == 2 else [])


MULTILABEL_KEYS = (
    *(f"{m}_{avg}" for avg in ("macro", "micro") for m in ("precision", "recall", "f1")),
    "map",
    "subset_accuracy",
    "hamming_loss",
    "loss",
)


def build_multilabel_metrics(num_labels: int, device: torch.device, *, threshold: float):
    """`data.task = "multilabel"`: torchmetrics' Multilabel* metrics at `threshold` (a label is predicted when its
    probability is above it): per-class and macro/micro precision, recall, F1; mAP (macro average precision, every
    score kept and gathered from all ranks, so exact under any world size); subset accuracy (exact match); Hamming
    loss; and the per-class stat scores (support = positives per class)."""
    from torchmetrics import MeanMetric, MetricCollection
    from torchmetrics.classification import (
        MultilabelAveragePrecision,
        MultilabelExactMatch,
        MultilabelF1Score,
        MultilabelHammingDistance,
        MultilabelPrecision,
        MultilabelRecall,
        MultilabelStatScores,
    )

    c, t = num_labels, threshold
    metrics: dict[str, nn.Module] = {}
    for avg in ("macro", "micro", "none"):
        suffix = "per_class" if avg == "none" else avg
        metrics[f"precision_{suffix}"] = MultilabelPrecision(c, threshold=t, average=avg)
        metrics[f"recall_{suffix}"] = MultilabelRecall(c, threshold=t, average=avg)
        metrics[f"f1_{suffix}"] = MultilabelF1Score(c, threshold=t, average=avg)
    metrics["map"] = MultilabelAveragePrecision(c, average="macro", thresholds=None)
    metrics["subset_accuracy"] = MultilabelExactMatch(c, threshold=t)
    metrics["hamming_loss"] = MultilabelHammingDistance(c, threshold=t, average="micro")
    metrics["stat_scores"] = MultilabelStatScores(c, threshold=t, average="none")  # (C, [tp, fp, tn, fn, support])
    collection = MetricCollection(metrics, compute_groups=False)  # as build_metrics: no state sharing
    return collection.to(device), {"loss": MeanMetric().to(device)}


class MultilabelEvaluator:
    """The multilabel counterpart of StreamingEvaluator: logits (B, C) and multi-hot targets (B, C)."""

    def __init__(
        self,
        num_labels: int,
        device: torch.device,
        *,
        threshold: float = 0.5,
        tune: bool = False,
        thresholds: list[float] | None = None,
    ) -> None:
        from torchmetrics.classification import MultilabelPrecisionRecallCurve

        self.num_classes, self.threshold = num_labels, threshold
        self.collection, self.extra = build_multilabel_metrics(num_labels, device, threshold=threshold)
        # every score kept, gathered from all ranks at compute time (as mAP's): exact under any world size
        self.pr_curve = MultilabelPrecisionRecallCurve(num_labels, thresholds=None).to(device)
        # per-label thresholds (fastft/thresholds.py): tuned here (`tune`), or a model's saved `thresholds`
        self.per_label = None
        if tune or thresholds is not None:
            from fastft.thresholds import per_label_metric

            self.per_label = per_label_metric(num_labels, fallback=threshold, saved=thresholds).to(device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.shape[0] == 0:
            return
        logits = logits.float()
        probs, targets = logits.sigmoid(), targets.long()
        self.collection.update(probs, targets)
        self.pr_curve.update(probs, targets)
        if self.per_label is not None:
            self.per_label.update(probs, targets)
        loss = F.binary_cross_entropy_with_logits(logits, targets.float())  # the training loss's mean
        self.extra["loss"].update(loss, weight=targets.shape[0])

    def compute(self) -> dict:
        out = self.collection.compute()
        stats = out.pop("stat_scores").long().cpu()
        report: dict = {"task": "multilabel", "threshold": self.threshold}
        for k in MULTILABEL_KEYS[:-1]:
            val = float(out[k])
            report[k] = val if not math.isnan(val) else None
        report["loss"] = float(self.extra["loss"].compute())
        report["num_samples"] = int(stats[0, :4].sum()) if len(stats) else 0  # tp + fp + tn + fn of one label
        report["per_class"] = [
            {
                "precision": float(out["precision_per_class"][i]),
                "recall": float(out["recall_per_class"][i]),
                "f1": float(out["f1_per_class"][i]),
                "support": int(stats[i, 4]),  # positives of label i
            }
            for i in range(self.num_classes)
        ]
        precision, recall, _ = self.pr_curve.compute()  # one curve per label; drawn in report.html
        report["pr_curve"] = {
            "labels": [{"precision": p.cpu().tolist(), "recall": r.cpu().tolist()} for p, r in zip(precision, recall)]
        }
        if self.per_label is not None:
            report.update(self.per_label.compute())
        return report

    def reset(self) -> None:
        self.collection.reset()
        self.pr_curve.reset()
        self.extra["loss"].reset()
        if self.per_label is not None:
            self.per_label.reset()


def make_evaluator(num_classes: int, device: torch.device, *, task: str = "multiclass", threshold: float = 0.5, **per):
    """The evaluator of a `data.task`: StreamingEvaluator (multiclass) or MultilabelEvaluator (`per`: its per-label
    thresholds, `tune` or saved `thresholds`)."""
    if task == "multilabel":
        return MultilabelEvaluator(num_classes, device, threshold=threshold, **per)
    return StreamingEvaluator(num_classes, device)


class StreamingEvaluator:
    """Accumulate predictions batch by batch; `compute()` returns the report dict (synced across ranks)."""

    def __init__(self, num_classes: int, device: torch.device, *, label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.collection, self.extra = build_metrics(num_classes, device)
        self.pr_curve = _pr_curve(device) if num_classes == 2 else None
        self.label_smoothing = label_smoothing
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.shape[0] == 0:  # an empty shard batch: nothing to count, and no collective happens here
            return
        logits = logits.float()
        probs = logits.softmax(dim=1)
        self.collection.update(probs, labels)
        loss = F.cross_entropy(logits, labels, reduction="mean")
        self.extra["loss"].update(loss, weight=labels.shape[0])
        if self.num_classes == 2:
            self.extra["auroc"].update(probs[:, 1], labels)
            self.extra["average_precision"].update(probs[:, 1], labels)
            self.pr_curve.update(probs[:, 1], labels)
        self.count += labels.shape[0]

    def compute(self) -> dict:
        out = {k: v for k, v in self.collection.compute().items()}
        for k, m in self.extra.items():
            out[k] = m.compute()
        cm = out.pop("confusion_matrix").long().cpu()
        report: dict = {}
        for k, v in out.items():
            if k.endswith("_per_class"):
                continue
            val = float(v)
            report[k] = val if not math.isnan(val) else None
        report["num_samples"] = int(cm.sum())
        support = cm.sum(dim=1).tolist()
        report["per_class"] = [
            {
                "precision": float(out["precision_per_class"][i]),
                "recall": float(out["recall_per_class"][i]),
                "f1": float(out["f1_per_class"][i]),
                "support": int(support[i]),
            }
            for i in range(self.num_classes)
        ]
        report["confusion_matrix"] = cm.tolist()
        if self.pr_curve is not None:  # binary: the positive class (index 1); drawn in report.html, not metrics.json
            precision, recall, _ = self.pr_curve.compute()
            report["pr_curve"] = {"precision": precision.cpu().tolist(), "recall": recall.cpu().tolist()}
        return report

    def reset(self) -> None:
        self.collection.reset()
        if self.pr_curve is not None:
            self.pr_curve.reset()
        for m in self.extra.values():
            m.reset()
        self.count = 0


def _batch_on(device: torch.device, images, n: int, *, pad_to: int, channels_last: bool):
    """A batch on `device`: a dict of token tensors as it is (text batches are never padded: their length varies
    batch to batch anyway), or an image tensor padded to `pad_to` rows and channels_last when asked."""
    if isinstance(images, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in images.items()}
    images = images.to(device, non_blocking=True)
    if pad_to and n < pad_to:
        images = torch.cat([images, images.new_zeros((pad_to - n, *images.shape[1:]))])
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def run_evaluation(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    *,
    num_classes: int,
    device: torch.device,
    precision: Precision,
    channels_last: bool = False,
    pad_to: int = 0,
    classes: list[str] | None = None,
    heads: int = 0,
    task: str = "multiclass",
    threshold: float = 0.5,
    tune_thresholds: bool = False,
    thresholds: list[float] | None = None,
) -> dict | list[dict]:
    """Evaluate `forward` over `loader`; `pad_to` > 0 pads short batches to that size (static shapes for compile).

    With `heads` = H > 0, `forward` returns (H, B, classes) and one report per head is returned. `task` =
    "multilabel": multi-hot targets (B, C), metrics at `threshold` (MultilabelEvaluator), and also at per-label
    thresholds tuned here (`tune_thresholds`) or given (`thresholds`, a model's saved ones)."""
    per = {"tune": tune_thresholds, "thresholds": thresholds} if task == "multilabel" else {}
    evs = [make_evaluator(num_classes, device, task=task, threshold=threshold, **per) for _ in range(max(heads, 1))]
    for images, labels in loader:
        n = labels.shape[0] if isinstance(images, Mapping) else images.shape[0]
        if n == 0:
            continue
        images = _batch_on(device, images, n, pad_to=pad_to, channels_last=channels_last)
        labels = labels.to(device, non_blocking=True)
        labels = labels.long() if labels.ndim == 1 else labels  # multilabel: (B, C) multi-hot
        with torch.inference_mode(), precision.autocast():
            logits = forward(images)
        logits = logits.float().clone()
        if heads:
            for h, ev in enumerate(evs):
                ev.update(logits[h, :n], labels)
        else:
            evs[0].update(logits[:n], labels)
    reports = [ev.compute() for ev in evs]
    if classes is not None:
        for report in reports:
            report["classes"] = list(classes)
            for name, row in zip(classes, report["per_class"]):
                row["class"] = name
    return reports if heads else reports[0]
