"""The loader seam (fastft/data/loaders.py): every loader build_loader makes is a `Loader`, files are checked once
there for all of them, and the data modules depend one way (loaders never import each other)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastft.config import DataConfig
from fastft.data import checks
from fastft.data.base import Loader
from fastft.data.loaders import build_loader, dali_available
from fastft.data.transforms import TransformSpec
from fastft.parallel.env import DistEnv

DATA = Path(__file__).resolve().parents[2] / "fastft" / "data"
KINDS = [
    "torch",
    "synthetic",
    pytest.param("dali", marks=[pytest.mark.dali, pytest.mark.skipif(not dali_available(), reason="no DALI")]),
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_loader_is_a_loader_and_files_are_checked_once_for_it(tmp_path, monkeypatch, kind) -> None:
    """9 good images and a bad one under `on_bad_file=skip`: each file is checked exactly once (by build_loader, not
    again by the loader), the bad one is in `skipped` and never loaded; the synthetic loader reads and checks none."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(9):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(32, 40, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), i))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image\n")
    samples.insert(4, (str(bad), 99))
    checked = []
    real = checks.check_image
    monkeypatch.setattr(checks, "check_image", lambda path: checked.append(path) or real(path))

    cfg = DataConfig(loader=kind, batch_size=4, workers=0, on_bad_file="skip")
    loader = build_loader(samples, TransformSpec(24, 28), cfg, train=False, seed=0, env=DistEnv())
    labels = sorted(int(y) for _, ys in loader for y in ys)
    loader.close()

    assert isinstance(loader, Loader)
    if kind == "synthetic":
        assert checked == [] and loader.skipped == [] and labels == sorted([*range(9), 99])
    else:
        assert sorted(checked) == sorted(p for p, _ in samples)  # each file once
        assert loader.skipped == [str(bad)] and labels == list(range(9))


def _data_imports() -> dict[str, set[str]]:
    """fastft/data module -> the fastft/data modules it imports (lazy imports inside functions included)."""
    names = {p.stem for p in DATA.glob("*.py")}
    graph = {}
    for path in DATA.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastft.data."):
                deps.add(node.module.split(".")[2])
            elif isinstance(node, ast.ImportFrom) and node.module == "fastft.data":
                deps.update(a.name for a in node.names if a.name in names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[2] for a in node.names if a.name.startswith("fastft.data."))
        graph[path.stem] = deps - {path.stem}
    return graph


def test_data_modules_import_one_way() -> None:
    """No import cycle among fastft/data modules; the torchvision and DALI loaders never import each other, and no
    loader imports the seam that picks between them."""
    graph = _data_imports()
    torch_side, dali_side = {"torch_loader"}, {m for m in graph if m.startswith("dali")}
    assert {"torch_loader", "dali_feed", "dali_pipeline", "sampler", "index", "checks"} <= set(graph)
    for module in torch_side | dali_side:
        other = dali_side if module in torch_side else torch_side
        assert not graph[module] & (other | {"loaders"}), (module, graph[module])

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(d == target or (d not in seen and reaches(d, target, seen | {d})) for d in graph.get(start, ()))

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert cycles == [], {m: graph[m] for m in cycles}
