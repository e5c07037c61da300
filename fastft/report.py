"""Render an evaluation report: console table, metrics.json, confusion_matrix.png and report.html."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastft.thresholds import table_lines

_SUMMARY = (
    "top1",
    "top5",
    "loss",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "auroc",
    "average_precision",
    "map",  # multilabel (data.task): macro average precision, subset accuracy, Hamming loss
    "subset_accuracy",
    "hamming_loss",
)


def format_table(report: dict) -> str:
    lines = [f"evaluation on {report['num_samples']} images"]
    if report.get("task") == "multilabel":
        lines[0] += f" (multilabel, threshold {report['threshold']:g}; support = positives per label)"
    for k in _SUMMARY:
        if report.get(k) is not None:
            ema = report.get(f"ema/{k}")  # the EMA of the weights (optim.ema_decay), on the same images
            lines.append(f"  {k:<20} {report[k]:.4f}" + (f"   ema {ema:.4f}" if ema is not None else ""))
    lines += table_lines(report)  # eval.tune_thresholds: the metrics at per-label thresholds, labelled
    rows = report.get("per_class", [])
    if rows:
        width = max(12, *(len(str(r.get("class", i))) for i, r in enumerate(rows)))
        lines.append(f"  {'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
        # most samples first (ties by name), as in report.html: rare classes sit together at the bottom
        for i, r in sorted(enumerate(rows), key=lambda t: (-t[1]["support"], str(t[1].get("class", t[0])))):
            lines.append(
                f"  {r.get('class', i)!s:<{width}} {r['precision']:>9.4f} {r['recall']:>9.4f} "
                f"{r['f1']:>9.4f} {r['support']:>8d}"
            )
    return "\n".join(lines)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def confusion_figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(report["confusion_matrix"])
    names = report.get("classes") or [str(i) for i in range(len(cm))]
    n = len(cm)
    size = min(3 + 0.45 * n, 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if cm[i, j] > thresh else "black",
                )
    ax.set_title(f"confusion matrix ({int(cm.sum())} images)")
    fig.tight_layout()
    return fig


def write_report(
    report: dict, out_dir: Path, *, prefix: str = "", events: Path | None = None, best_metric: str | None = None
) -> dict[str, Path]:
    """Write metrics.json, confusion_matrix.png (not for a multilabel report) and report.html (with a run's curves
    from `events`) into out_dir; returns their paths."""
    import matplotlib.pyplot as plt

    from fastft.report_html import write_html

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / f"{prefix}metrics.json"}
    # the PR curve has a point per sample: drawn in report.html, left out of metrics.json
    atomic_write_text(
        paths["metrics"], json.dumps({k: v for k, v in report.items() if k != "pr_curve"}, indent=2) + "\n"
    )
    png = None
    if "confusion_matrix" in report:  # a multilabel report has none (labels are not exclusive)
        paths["confusion_matrix"] = out_dir / f"{prefix}confusion_matrix.png"
        fig = confusion_figure(report)
        tmp = paths["confusion_matrix"].with_name(f".{paths['confusion_matrix'].name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, paths["confusion_matrix"])
        png = paths["confusion_matrix"].read_bytes()
    paths["html"] = write_html(
        report, out_dir / f"{prefix}report.html", events=events, best_metric=best_metric, counts_png=png
    )
    return paths
