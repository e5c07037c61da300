"""Per-label thresholds of a multilabel run (`eval.tune_thresholds`): tuned on the validation set, saved with the model.

- Exact under any number of ranks: every (probability, target) pair is kept in torchmetrics list states, which
  torchmetrics gathers from all ranks at compute time (as mAP's), so the search sees the whole set on every rank.
- The search: for each label, the threshold among GRID (0.01, 0.02, ..., 0.99) whose F1 on the validation set is
  highest, a label predicted when its probability is above it (torchmetrics' rule, as at `eval.threshold`). The grid's
  step (0.01) bounds how close the search gets: an optimum between two grid values is not looked for. Ties: the lowest
  threshold among the best. A label whose best F1 is 0 (no positive in the validation set, or none ever found) keeps
  `eval.threshold`.
- The metrics at the tuned thresholds are reported under `tuned/` keys next to those at `eval.threshold`; they are
  optimistic: the thresholds were chosen on the very samples they are measured on.
- Saved: the thresholds of the model a checkpoint gives go into its meta (`thresholds`) and an export's metadata and
  preprocess.json; `fastft predict` picks a label above its own threshold and `fastft eval` reports at them (as
  `tuned/` keys, labelled as saved with the model). A model without them uses `eval.threshold` alone, as before.
"""

from __future__ import annotations

import functools
import html

import torch

GRID = tuple(k / 100 for k in range(1, 100))
PREFIX = "tuned/"
KEYS = (
    *(f"{m}_{avg}" for avg in ("macro", "micro") for m in ("precision", "recall", "f1")),
    "subset_accuracy",
    "hamming_loss",
)
TUNED_NOTE = "tuned per label on this validation set (optimistic: chosen on the samples they are measured on)"
SAVED_NOTE = "saved with the model (tuned on its run's validation set)"


def tune(probs: torch.Tensor, target: torch.Tensor, *, fallback: float) -> list[float]:
    """Each label's F1-maximising threshold over GRID (lowest among ties; `fallback` where the best F1 is 0).

    One pass over the scores: each probability's bucket is the number of grid values below it (it is predicted at
    exactly those thresholds: `p > t`, compared in float32 as torchmetrics compares a threshold), and per-label
    histograms of the buckets give every threshold's integer tp / fp / fn."""
    c, t = probs.shape[1], len(GRID)
    grid = torch.tensor(GRID, dtype=probs.dtype, device=probs.device)
    bucket = torch.searchsorted(grid, probs.contiguous(), right=False)  # (N, C): #{k : grid[k] < p}
    index = bucket + (t + 1) * torch.arange(c, device=probs.device)  # one histogram row per label
    pos = target.bool()
    hist_pos = torch.bincount(index[pos], minlength=c * (t + 1)).view(c, t + 1)
    hist_neg = torch.bincount(index[~pos], minlength=c * (t + 1)).view(c, t + 1)
    tp, fp = _above(hist_pos), _above(hist_neg)
    fn = hist_pos.sum(1, keepdim=True).double() - tp
    denom = 2 * tp + fp + fn  # F1 = 2tp / (2tp + fp + fn): one correctly rounded division, so equal F1s tie
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), 0.0)
    best, at = f1.max(dim=1), f1.argmax(dim=1)  # argmax: the first (lowest) of the maxima
    return [GRID[int(i)] if float(b) > 0 else fallback for b, i in zip(best.values.tolist(), at.tolist())]


def _above(hist: torch.Tensor) -> torch.Tensor:
    """Per label and grid index k: the count in buckets > k (predicted at grid[k])."""
    return hist.flip(1).cumsum(1).flip(1)[:, 1:].double()


def metrics_at(probs: torch.Tensor, target: torch.Tensor, thresholds: list[float]) -> dict:
    """torchmetrics' multilabel metrics with label i predicted when its probability is above thresholds[i]."""
    from torchmetrics.functional.classification import (
        multilabel_exact_match,
        multilabel_f1_score,
        multilabel_hamming_distance,
        multilabel_precision,
        multilabel_recall,
    )

    c = probs.shape[1]
    # the same float32 comparison as a scalar threshold's (a Python float meets a float32 tensor as float32)
    pred = (probs > torch.tensor(thresholds, dtype=probs.dtype, device=probs.device)).long()
    fns = {"precision": multilabel_precision, "recall": multilabel_recall, "f1": multilabel_f1_score}
    kw = {"validate_args": False}  # 0/1 predictions built here; the checks would scan every value again
    out = {
        f"{m}_{avg}": float(fn(pred, target, c, average=avg, **kw))
        for avg in ("macro", "micro")
        for m, fn in fns.items()
    }
    out["subset_accuracy"] = float(multilabel_exact_match(pred, target, c, **kw))
    out["hamming_loss"] = float(multilabel_hamming_distance(pred, target, c, average="micro", **kw))
    out["f1_per_class"] = multilabel_f1_score(pred, target, c, average="none", **kw).tolist()
    return out


def per_label_metric(num_labels: int, *, fallback: float, saved: list[float] | None = None):
    """A torchmetrics Metric keeping every probability and target (gathered from all ranks at compute); its compute()
    tunes the thresholds (or takes `saved` ones) and returns the report entries at them."""
    return _metric_class()(num_labels, fallback=fallback, saved=saved)


@functools.cache
def _metric_class() -> type:
    # built on first use: importing torchmetrics at module import would cost every rank's start-up
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat

    class PerLabelThresholds(Metric):
        full_state_update = False

        def __init__(self, num_labels: int, *, fallback: float, saved: list[float] | None) -> None:
            super().__init__()
            self.num_labels, self.fallback, self.saved = num_labels, fallback, saved
            self.add_state("probs", default=[], dist_reduce_fx="cat")
            self.add_state("target", default=[], dist_reduce_fx="cat")

        def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
            self.probs.append(probs.float())
            self.target.append(target.long())

        def compute(self) -> dict:
            if isinstance(self.probs, list) and not self.probs:  # (synced, the lists are one tensor) no sample
                return {}
            probs, target = dim_zero_cat(self.probs), dim_zero_cat(self.target)
            chosen = self.saved if self.saved is not None else tune(probs, target, fallback=self.fallback)
            at = metrics_at(probs, target, chosen)
            per_f1 = at.pop("f1_per_class")
            return {
                **{f"{PREFIX}{k}": v for k, v in at.items()},
                f"{PREFIX}thresholds": list(chosen),
                f"{PREFIX}f1_per_class": per_f1,
                f"{PREFIX}note": SAVED_NOTE if self.saved is not None else TUNED_NOTE,
            }

    return PerLabelThresholds


def of_report(report: dict, *, ema: bool = False) -> list[float] | None:
    """The thresholds a report tuned (its EMA model's with `ema`), or None."""
    return report.get(f"ema/{PREFIX}thresholds" if ema else f"{PREFIX}thresholds")


def with_thresholds(meta: dict, thresholds: list[float] | None) -> dict:
    """A new meta dict carrying `thresholds` (a new dict: a checkpoint write in flight keeps the one it was given)."""
    return meta if thresholds is None else {**meta, "thresholds": list(thresholds)}


def table_lines(report: dict) -> list[str]:
    """The printed table's lines for the tuned metrics, beside those at eval.threshold."""
    if f"{PREFIX}thresholds" not in report:
        return []
    lines = [f"  at per-label thresholds, {report[PREFIX + 'note']}:"]
    lines += [f"  {k:<20} {report[k]:.4f}   tuned {report[PREFIX + k]:.4f}" for k in KEYS if report.get(k) is not None]
    names = report.get("classes") or [str(i) for i in range(len(report[PREFIX + "thresholds"]))]
    pairs = zip(names, report[PREFIX + "thresholds"], report[PREFIX + "f1_per_class"])
    lines.append("  thresholds: " + ", ".join(f"{n} {t:g} (f1 {f:.4f})" for n, t, f in pairs))
    return lines


def html_section(report: dict) -> str:
    """report.html's section: each metric at eval.threshold and at the per-label thresholds, and the thresholds."""
    if f"{PREFIX}thresholds" not in report:
        return ""

    def row(cells: list) -> str:
        tds = "".join(f"<td>{html.escape(c if isinstance(c, str) else f'{c:.4f}')}</td>" for c in cells)
        return f"<tr>{tds}</tr>"

    at = f"at {report['threshold']:g}"
    head = f"<tr><th>metric</th><th>{at}</th><th>at per-label thresholds</th></tr>"
    rows = "".join(row([k, report[k], report[PREFIX + k]]) for k in KEYS if report.get(k) is not None)
    names = report.get("classes") or [str(i) for i in range(len(report[PREFIX + "thresholds"]))]
    per = zip(names, report[PREFIX + "thresholds"], report[PREFIX + "f1_per_class"])
    labels = "".join(row([n, f"{t:g}", f]) for n, t, f in per)
    return (
        f'<h2>Per-label thresholds</h2><p>{html.escape(report[PREFIX + "note"])}</p><div id="tuned">'
        f"<table>{head}{rows}</table><table><tr><th>label</th><th>threshold</th><th>f1 at it</th></tr>{labels}</table>"
        "</div>"
    )
