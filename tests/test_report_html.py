"""report.html: the tables hold the report's figures, the per-class rows go by support, every image is an embedded
PNG, nothing is fetched from the network, class names are escaped, and the file is written atomically."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import tiny_config
from PIL import Image

from fastft.report import format_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Tables (by the id of the div around them) as lists of rows of cell text, <img> srcs, every attribute value."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.attrs: list[str] = []
        self.scripts = 0
        self._div: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        self.attrs += [v or "" for v in a.values()]
        if tag == "div":
            self._div = a.get("id")
        elif tag == "tr" and self._div:
            self.tables.setdefault(self._div, []).append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag) -> None:
        if tag in ("td", "th") and self._cell is not None and self._div:
            self.tables[self._div][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "div":
            self._div = None

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _report() -> dict:
    """Three classes, supports 2 / 9 / 9 (a tie broken by name), one name with markup in it."""
    names = ["rare", "zebra", "<script>alert(1)</script>"]
    cm = [[1, 1, 0], [0, 8, 1], [2, 0, 7]]
    rows = [
        {"class": n, "precision": p, "recall": r, "f1": f, "support": sum(cm[i])}
        for i, (n, p, r, f) in enumerate(
            zip(names, [0.3333, 0.8889, 0.875], [0.5, 0.8889, 0.7778], [0.4, 0.8889, 0.8235])
        )
    ]
    return {
        "top1": 0.8,
        "f1_macro": 0.7041,
        "loss": 0.61,
        "auroc": None,
        "num_samples": 20,
        "per_class": rows,
        "confusion_matrix": cm,
        "classes": names,
    }


def _events(path: Path) -> Path:
    lines = [{"event": "start"}]
    for epoch, loss in ((1, 1.2), (2, 0.9), (3, 0.7)):
        lines.append({"event": "step", "epoch": epoch - 1, "step": epoch * 5, "loss": loss, "lr": 0.01 / epoch})
        lines.append({"event": "eval", "epoch": epoch, "step": epoch * 5, "train_loss": loss, "img_per_s": 100.0,
                      "top1": 0.5 + epoch / 10, "f1_macro": 0.4 + epoch / 10, "loss": loss})  # fmt: skip
    path.write_text("".join(json.dumps(e) + "\n" for e in lines))
    return path


def _parse(path: Path) -> tuple[Page, str]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return page, text


def _png_sizes(page: Page) -> list[tuple[int, int]]:
    sizes = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        data = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert data[:8] == PNG_SIGNATURE
        sizes.append(Image.open(io.BytesIO(data)).size)
    return sizes


def test_report_html_tables_images_and_escaping(tmp_path) -> None:
    report = _report()
    paths = write_report(report, tmp_path, events=_events(tmp_path / "events.jsonl"), best_metric="f1_macro")
    assert paths["html"] == tmp_path / "report.html"
    page, text = _parse(paths["html"])
    # the metric table: exactly the scalar keys, each value as written in the report
    metrics = {k: v for k, v in page.tables["metrics"][1:]}
    assert metrics == {"top1": "0.8000", "f1_macro": "0.7041", "loss": "0.6100", "auroc": "n/a"}
    # per class: by support, the tie (9, 9) by class name ("<" sorts before "z"), the rare class last
    rows = page.tables["per-class"]
    assert rows[0] == ["class", "precision", "recall", "f1", "support"]
    assert [r[0] for r in rows[1:]] == ["<script>alert(1)</script>", "zebra", "rare"]
    assert rows[3] == ["rare", "0.3333", "0.5000", "0.4000", "2"]
    # the class name is text, never markup
    assert page.scripts == 0 and "<script>" not in text and "&lt;script&gt;" in text
    # 2 confusion matrices + train_loss, val loss, f1_macro (best), top1, img_per_s per epoch + lr per step
    sizes = _png_sizes(page)
    assert len(sizes) == 8
    assert sizes[2:] == [(400, 256)] * 6  # figsize (5, 3.2) at 80 dpi
    assert "no per-epoch curves" not in text
    # self-contained: no address anywhere, neither in attributes nor in the text
    assert not any(a.startswith(("http:", "https:", "//")) for a in page.attrs)
    assert "http://" not in text and "https://" not in text
    # atomic: nothing but the outputs is left in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_matrix.png",
        "events.jsonl",
        "metrics.json",
        "report.html",
    ]


def test_an_evaluation_report_has_both_matrices_and_says_it_has_no_curves(tmp_path) -> None:
    page, text = _parse(write_report(_report(), tmp_path)["html"])
    assert len(_png_sizes(page)) == 2
    assert "no per-epoch curves" in text


def test_row_normalised_divides_each_row_by_its_support() -> None:
    from fastft.report_html import row_normalised

    got = row_normalised([[1, 1, 0], [0, 8, 1], [2, 0, 7], [0, 0, 0]])
    assert got.tolist() == [[0.5, 0.5, 0.0], [0.0, 0.89, 0.11], [0.22, 0.0, 0.78], [0.0, 0.0, 0.0]]


def test_a_failed_write_leaves_the_old_report_and_no_temp_file(tmp_path, monkeypatch) -> None:
    from fastft import report_html

    old = write_report(_report(), tmp_path)["html"].read_text()

    def broken(self, *a, **k):
        self.open("w").write("<html>half")
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        report_html.write_html(_report(), tmp_path / "report.html")
    monkeypatch.undo()
    assert (tmp_path / "report.html").read_text() == old
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_console_table_lists_classes_by_support() -> None:
    lines = format_table(_report()).splitlines()
    classes = [ln.split()[0] for ln in lines if ln.split()[-1].isdigit() and not ln.startswith("evaluation")]
    assert classes == ["<script>alert(1)</script>", "zebra", "rare"]


@pytest.mark.slow  # a real 2-epoch run: ~25 s on a loaded 2-core machine
def test_a_training_run_writes_report_html_with_its_curves(shapes4, tmp_path) -> None:
    from fastft.train import finetune

    result = finetune(tiny_config(shapes4, tmp_path, optim__epochs=2))
    page, text = _parse(result.run_dir / "report.html")
    assert result.paths["html"] == result.run_dir / "report.html"
    events = [json.loads(ln) for ln in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in events if e["event"] == "eval"] == [1, 2]
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    table = dict(page.tables["metrics"][1:])
    assert table == {k: f"{v:.4f}" for k, v in metrics.items() if isinstance(v, float)}
    supports = [int(r[-1]) for r in page.tables["per-class"][1:]]
    assert sorted(supports, reverse=True) == supports and sum(supports) == 24
    # 2 confusion matrices, 5 per-epoch curves (train_loss, loss, f1_macro = best_metric, top1, img_per_s), lr
    assert len(_png_sizes(page)) == 8 and "no per-epoch curves" not in text
    assert not [p.name for p in result.run_dir.iterdir() if p.name.startswith(".")]


def test_eval_out_replaces_only_a_report_html_that_fastft_wrote(tmp_path) -> None:
    from fastft.errors import ConfigError
    from fastft.outputs import check_report_target, clear_outputs

    ckpt, data = tmp_path / "best.pt", tmp_path / "val"
    write_report(_report(), tmp_path / "ours")
    (tmp_path / "ours" / "metrics.json").unlink()
    (tmp_path / "ours" / "confusion_matrix.png").unlink()
    with pytest.raises(ConfigError, match=r"report\.html already exists"):
        check_report_target(tmp_path / "ours", checkpoint=ckpt, data=data, overwrite=False)
    check_report_target(tmp_path / "ours", checkpoint=ckpt, data=data, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("<html><body>my notes</body></html>")
    with pytest.raises(ConfigError, match=r"report\.html exists and was not written by fastft"):
        check_report_target(mine, checkpoint=ckpt, data=data, overwrite=True)
    clear_outputs(tmp_path / "ours")  # a run folder's --overwrite removes the old run's report.html
    assert not (tmp_path / "ours" / "report.html").exists()


def test_many_classes_get_a_plain_normalised_matrix() -> None:
    """Over 50 classes the normalised matrix is drawn without class names at 10 in x 80 dpi (the counts image is the
    confusion_matrix.png already written, passed through as it is)."""
    from fastft.report_html import render_html

    n = 60
    cm = [[5 if i == j else 0 for j in range(n)] for i in range(n)]
    rows = [{"class": f"c{i}", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5} for i in range(n)]
    report = {"top1": 1.0, "num_samples": 5 * n, "per_class": rows, "confusion_matrix": cm}
    buf = io.BytesIO()
    Image.new("RGB", (7, 3)).save(buf, format="PNG")
    page = Page()
    page.feed(render_html(report, counts_png=buf.getvalue()))
    assert _png_sizes(page) == [(7, 3), (800, 800)]
    assert [r[0] for r in page.tables["per-class"][1:]] == sorted(f"c{i}" for i in range(n))  # all tied: by name


@pytest.mark.slow  # a real 1-epoch run and a rebuild of its model: ~40 s on a loaded 2-core machine
def test_a_binary_run_reports_the_exact_precision_recall_curve(shapes2, tmp_path) -> None:
    """The page embeds the PR curve; average precision and the curve equal scikit-learn's on the validation scores
    recomputed from the saved model (the report's AP, to 1e-6; the curve's points, to 1e-6)."""
    import numpy as np
    import torch
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from fastft.api import load_trained
    from fastft.config import DataConfig
    from fastft.data.loaders import build_loader
    from fastft.data.transforms import TransformSpec
    from fastft.parallel.env import DistEnv
    from fastft.train import finetune

    result = finetune(tiny_config(shapes2, tmp_path, optim__epochs=1))
    model, meta = load_trained(result.run_dir / "last.pt", torch.device("cpu"))
    classes = meta["classes"]
    samples = [(str(f), classes.index(f.parent.name)) for f in sorted((shapes2 / "val").rglob("*.jpg"))]
    spec = TransformSpec.from_dict(meta["transform"])
    dl = build_loader(samples, spec, DataConfig(workers=0, batch_size=8), train=False, seed=0, env=DistEnv())
    with torch.inference_mode():
        batches = [(model(x).float().softmax(dim=1)[:, 1], y) for x, y in dl]
    scores, labels = (torch.cat(t).numpy() for t in zip(*batches))
    assert len(scores) == 16 and 0 < labels.sum() < 16
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["average_precision"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert "pr_curve" not in metrics  # one point per score: drawn, not written
    precision, recall, _ = precision_recall_curve(labels, scores)
    curve = result.metrics["pr_curve"]
    np.testing.assert_allclose(curve["precision"], precision, atol=1e-6)
    np.testing.assert_allclose(curve["recall"], recall, atol=1e-6)
    page, text = _parse(result.run_dir / "report.html")
    # 2 confusion matrices, the PR curve (figsize (5, 4) at 80 dpi), 5 per-epoch curves
    sizes = _png_sizes(page)
    assert len(sizes) == 8 and sizes[2] == (400, 320)
    assert "Precision-recall" in text and f"positive class: {classes[1]}" in text


def test_a_multiclass_report_has_no_precision_recall_curve(tmp_path) -> None:
    page, text = _parse(write_report(_report(), tmp_path)["html"])
    assert "Precision-recall" not in text and len(_png_sizes(page)) == 2
