"""report.html: one self-contained page (no network) with the metric table, the per-class table, the confusion matrix
(counts and row-normalised), a binary task's precision-recall curve (a multilabel task's: one per label, and no
confusion matrix) and the run's per-epoch curves, every figure an embedded PNG."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from fastft.outputs import atomic_target
from fastft.thresholds import PREFIX as TUNED
from fastft.thresholds import html_section

MARKER = '<meta name="generator" content="fastft report">'  # how fastft.outputs knows the file is fastft's own
_STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;margin:.5em}"
)


def by_support(rows: list[dict]) -> list[dict]:
    """Per-class rows, most samples first (ties by class name), so rare classes sit together at the bottom."""
    return sorted(rows, key=lambda r: (-r["support"], str(r.get("class", ""))))


def read_curves(events: Path | None) -> dict[str, list[dict]]:
    """The `eval` events (the last one per epoch: a resumed run may log an epoch twice) and the `step` events."""
    evals: dict[int, dict] = {}
    steps: list[dict] = []
    if events is not None and events.is_file():
        for line in events.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if e.get("event") == "eval":
                evals[e["epoch"]] = e
            elif e.get("event") == "step" and e.get("lr") is not None:
                steps.append(e)
    return {"eval": [evals[k] for k in sorted(evals)], "step": steps}


def _img(png: bytes) -> str:
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return _img(buf.getvalue())


def row_normalised(cm: list[list[int]]):
    """Each true class's row divided by its support (2 decimals; a class with no samples stays a row of zeros)."""
    import numpy as np

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    return np.round(np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0), 2)


def _confusion_images(report: dict, counts_png: bytes | None) -> list[str]:
    from fastft.report import confusion_figure

    counts = _img(counts_png) if counts_png is not None else _png(confusion_figure(report))
    normed = row_normalised(report["confusion_matrix"])
    title = "row-normalised"
    if len(normed) <= 50:
        fig = confusion_figure({**report, "confusion_matrix": normed})
        fig.axes[0].set_title(title)
        fig.tight_layout()  # again: the new title is longer
    else:  # no class names: unreadable at this size, and laying out their labels costs most of the render
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 10))
        ax.imshow(normed, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set(xlabel="predicted (class index)", ylabel="true (class index)", title=title)
        fig.tight_layout()
    return [counts, _png(fig)]


def _curve_images(curves: dict[str, list[dict]], best_metric: str | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals, images = curves["eval"], []
    keys = ["train_loss", "loss", best_metric, "top1", "img_per_s"]
    for key in dict.fromkeys(k for k in keys if k):  # ordered, without repeats (best_metric may be top1)
        points = [(e["epoch"], e[key]) for e in evals if e.get(key) is not None]
        if points:
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot(*zip(*points), marker="o")
            label = "val loss" if key == "loss" else key
            ax.set(xlabel="epoch", ylabel=label, title=label + (" (best metric)" if key == best_metric else ""))
            ax.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
            fig.tight_layout()
            images.append(_png(fig))
    if curves["step"]:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([e["step"] for e in curves["step"]], [e["lr"] for e in curves["step"]])
        ax.set(xlabel="step", ylabel="lr", title="learning rate")
        fig.tight_layout()
        images.append(_png(fig))
    return images


def pr_image(report: dict) -> str | None:
    """The precision-recall curve of a binary report's positive class (the second class), or a multilabel report's
    curve per label, or None without one."""
    curve = report.get("pr_curve")
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = report.get("average_precision", report.get("map"))
    fig, ax = plt.subplots(figsize=(5, 4))
    # the curve's points run from high thresholds to low; precision is constant between recall levels
    labels = curve.get("labels") or [curve]  # multilabel: one curve per label
    for i, c in enumerate(labels):
        ax.step(c["recall"], c["precision"], where="post", label=f"label {i}" if len(labels) > 1 else None)
    if 1 < len(labels) <= 10:
        ax.legend(fontsize=7)  # numbered (names may hold mathtext): the index is the label's place in `classes`
    name = "mAP" if "labels" in curve else "AP"
    title = "precision-recall" + (f" ({name} {ap:.4f})" if ap is not None else "")  # no class name: mathtext
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    fig.tight_layout()
    return _png(fig)


def _positive(report: dict) -> str:
    classes = report.get("classes") or []
    return str(classes[1]) if len(classes) > 1 else "1"


def _pr_note(report: dict) -> str:
    """Whose curve it is: a binary task's positive class, or a multilabel task's labels by index."""
    if report.get("task") == "multilabel":
        classes = report.get("classes") or []
        return "one curve per label: " + ", ".join(f"{i} = {c}" for i, c in enumerate(classes))
    return f"positive class: {_positive(report)}"


def _task_note(report: dict) -> str:
    """A multilabel report's threshold, and what support counts there (it has no confusion matrix)."""
    if report.get("task") != "multilabel":
        return ""
    return f" (multilabel, threshold {report['threshold']:g}; support = positives per label)"


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v, tag: str) -> str:
        text = "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        return f"<{tag}>{html.escape(text)}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(
    report: dict, *, events: Path | None = None, best_metric: str | None = None, counts_png: bytes | None = None
) -> str:
    """The page for `report`; curves come from `events` (a run's events.jsonl) when given and it holds evaluations;
    `counts_png` is the counts matrix already rendered (confusion_matrix.png), drawn here when not given."""
    scalars = [[k, v] for k, v in report.items() if isinstance(v, float) or (v is None and k != "early_stop")]
    scalars = [r for r in scalars if not r[0].startswith(TUNED)]  # in their own section, beside the others
    named = [{**r, "class": r.get("class", str(i))} for i, r in enumerate(report.get("per_class", []))]
    per_class = [[r["class"], r["precision"], r["recall"], r["f1"], r["support"]] for r in by_support(named)]
    curves = _curve_images(read_curves(events), best_metric)
    pr = pr_image(report)
    parts = [
        f'<!DOCTYPE html><html><head><meta charset="utf-8">{MARKER}<title>fastft report</title>',
        f"<style>{_STYLE}</style></head><body><h1>fastft report</h1>",
        f"<p>evaluation on {int(report['num_samples'])} images{_task_note(report)}</p>",
        '<h2>Metrics</h2><div id="metrics">' + _table(["metric", "value"], scalars) + "</div>",
        '<h2>Per class (by support)</h2><div id="per-class">',
        _table(["class", "precision", "recall", "f1", "support"], per_class) + "</div>",
        "<h2>Confusion matrix</h2>" + "".join(_confusion_images(report, counts_png))
        if "confusion_matrix" in report
        else "",
        html_section(report),  # eval.tune_thresholds
        f"<h2>Precision-recall</h2><p>{html.escape(_pr_note(report))}</p>{pr}" if pr else "",
        "<h2>Curves</h2>"
        + ("".join(curves) if curves else "<p>no per-epoch curves: this report is not from a training run</p>"),
        "</body></html>\n",
    ]
    return "".join(parts)


def write_html(
    report: dict,
    path: Path,
    *,
    events: Path | None = None,
    best_metric: str | None = None,
    counts_png: bytes | None = None,
) -> Path:
    """Write report.html atomically (temp file + rename); returns its path."""
    text = render_html(report, events=events, best_metric=best_metric, counts_png=counts_png)
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
