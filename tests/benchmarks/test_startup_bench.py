"""benchmarks/startup_bench.py's own pieces, without launching anything: the control tree really checks every file
on every rank, the headline is read off the right events, and the generated folder is valid input that is reused."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

from fastft.data import checks

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


startup_bench = _load("startup_bench", REPO / "benchmarks" / "startup_bench.py")  # by path: any runner's sys.path


def test_the_unsharded_control_checks_every_file_on_every_rank(tmp_path) -> None:
    from PIL import Image

    paths = []
    for i, kind in enumerate(["bad", "good", "bad", "good"]):
        path = tmp_path / f"{i}.jpg"
        if kind == "good":
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(path)
        else:
            path.write_bytes(b"\xff\xd8\xff not a jpeg")
        paths.append(str(path))
    rank1 = SimpleNamespace(distributed=True, rank=1, world_size=2)
    assert checks.scan_images(paths[rank1.rank :: rank1.world_size]) == []  # rank 1's own share holds no bad file

    source = tmp_path / "checks_unsharded.py"
    source.write_text(startup_bench.unshard(Path(checks.__file__).read_text()))
    unsharded = _load("checks_unsharded", source)
    # No process group: the sharded code would call all_gather_object; the control scans all four files on rank 1.
    assert [p for p, _ in unsharded.find_bad_files(paths, threads=1, env=rank1)] == [paths[0], paths[2]]
    assert startup_bench.unshard(source.read_text()) == source.read_text()  # idempotent on a reused tree


def test_first_step_is_the_step_1_event_and_setup_the_start_event() -> None:
    events = [
        {"time": 103.5, "event": "start"},
        {"time": 110.25, "event": "step", "step": 1},
        {"time": 111.0, "event": "step", "step": 2},
    ]
    assert startup_bench.first_step_times(events, 100.0) == {"setup_s": 3.5, "first_step_s": 10.25}
    assert startup_bench.first_step_times(events[:1], 100.0)["first_step_s"] is None  # no step: no figure


def test_generated_folder_passes_the_file_check_and_is_reused(tmp_path) -> None:
    root = startup_bench.make_folder(tmp_path / "d", files=7, classes=3, val_per_class=1, size=16, threads=2)
    train = startup_bench.list_files(root / "train")
    assert len(train) == 7 and len(startup_bench.list_files(root / "val")) == 3
    assert {Path(p).parent.name for p in train} == {"class00", "class01", "class02"}
    assert checks.scan_images(train, threads=2) == []
    stamp = Path(train[0]).stat().st_mtime_ns
    startup_bench.make_folder(tmp_path / "d", files=7, classes=3, val_per_class=1, size=16, threads=2)
    assert Path(train[0]).stat().st_mtime_ns == stamp
