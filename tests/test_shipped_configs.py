"""Every file in configs/ runs: 2 optimizer steps on a tiny generated folder, through the launcher it is meant for
(parallel.backend = "deepspeed": launchers/deepspeed.sh with 2 processes; otherwise `python -m fastft train`).

Overridden, and only these: the data folder, random weights (no download), 2 steps, batch 2 per process, no loader
workers, the output folder, and 32 px images for models that take any size (ViTs keep their native 224 px).
Everything else (model, freeze policy, optimizer, precision, compile target, feature cache, backend, ZeRO stage)
comes from the file.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_deepspeed_launcher

pytestmark = pytest.mark.slow

CONFIGS = sorted((REPO / "configs").glob("*.toml"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from fastft.data.synthetic import make_image_folder

    return make_image_folder(
        tmp_path_factory.mktemp("configs-data"),
        num_classes=2,
        train_per_class=4,
        val_per_class=1,
        image_size=32,
        seed=6,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_trains_two_steps_through_its_launcher(path, tiny_folder, tmp_path) -> None:
    shipped = tomllib.loads(path.read_text())
    deepspeed = shipped.get("parallel", {}).get("backend") == "deepspeed"
    if deepspeed:
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'fastft[deepspeed]')")
    model = shipped["model"]["name"]
    args = [
        f"--config={path}",
        f"--data.root={tiny_folder}",
        "--model.weights=none",
        "--optim.max_steps=2",
        "--data.batch_size=2",
        "--data.workers=0",
        "--log.every_steps=1",
        "--log.progress=false",
        f"--run.out_dir={tmp_path}",
        "--run.name=shipped",
    ]
    if not model.startswith("vit"):  # torchvision's ViTs are built for one input size
        args.append("--data.image_size=32")
    p = run_deepspeed_launcher(*args) if deepspeed else run_cli("train", *args)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-6000:])

    run = tmp_path / "shipped"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == (2 if deepspeed else 1)
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert events[-1]["event"] == "end" and events[-1]["step"] == 2
    resolved = tomllib.loads((run / "config.toml").read_text())
    for section, values in shipped.items():  # what the file asks for is what ran, apart from the overrides above
        for key, value in values.items():
            if (section, key) in {("data", "root"), ("model", "weights"), ("data", "batch_size"), ("data", "workers")}:
                continue
            if (section, key) == ("run", "name") or (section, key) == ("data", "image_size"):
                continue
            assert resolved[section][key] == value, f"{path.name}: {section}.{key}"
    assert (run / "model.safetensors").is_file() and (run / "metrics.json").is_file()
