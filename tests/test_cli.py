"""The real CLI in a subprocess: bad input gives exit code 2 and one line naming the problem; train/eval/predict."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

FAST = [
    "--model.weights=none",
    "--data.image_size=32",
    "--data.batch_size=8",
    "--data.workers=0",
    "--precision.dtype=fp32",
    "--log.progress=false",
    "--run.device=cpu",
]


def _one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("fastft: error")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_missing_data_folder(tmp_path) -> None:
    p = run_cli("train", f"--data.root={tmp_path / 'nope'}", *FAST, f"--run.out_dir={tmp_path}")
    _one_line_error(p, "data folder not found", "nope")


def test_class_folder_without_images(shapes4, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(shapes4, data)
    (data / "train" / "zebra").mkdir()
    (data / "train" / "zebra" / "notes.txt").write_text("no images here")
    p = run_cli("train", f"--data.root={data}", *FAST, f"--run.out_dir={tmp_path / 'runs'}")
    _one_line_error(p, "class folder has no images", "zebra")
    assert not (tmp_path / "runs").exists()  # failed before creating anything


def test_unknown_model_name(shapes4, tmp_path) -> None:
    p = run_cli("train", f"--data.root={shapes4}", *FAST, "--model.name=resnet1", f"--run.out_dir={tmp_path}")
    _one_line_error(p, "unknown model 'resnet1'", "resnet18")


def test_unknown_config_key_in_file_and_override(tmp_path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[optim]\nlearning_rate = 0.1\n")
    _one_line_error(run_cli("train", "--config", str(cfg)), "optim.learning_rate")
    _one_line_error(run_cli("train", "--data.rooot=x"), "data.rooot", "data.root")


def test_wrong_type_and_out_of_range(tmp_path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('[data]\nbatch_size = "big"\n')
    _one_line_error(run_cli("train", "--config", str(cfg)), "data.batch_size", "int")
    _one_line_error(run_cli("train", "--optim.lr=-1"), "optim.lr")


def test_bad_checkpoint_for_eval(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _one_line_error(run_cli("eval", "--checkpoint", str(bad), "--data", str(tmp_path)), "bad.pt")


@pytest.mark.slow
def test_train_then_eval_then_predict(shapes4, tmp_path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[data]\nroot = "{shapes4}"\n[optim]\nepochs = 1\nlr = 0.01\n[run]\nname = "cli"\n')
    p = run_cli("train", "--config", str(cfg), *FAST, f"--run.out_dir={tmp_path / 'runs'}")
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "runs" / "cli"
    assert "f1_macro" in p.stdout and (run_dir / "metrics.json").is_file()
    written = (run_dir / "config.toml").read_text()
    assert 'root = "' + str(shapes4) + '"' in written and "epochs = 1" in written
    # where the time went before the first step and after the last one, phase by phase
    events = {e["event"]: e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())}
    setup, teardown = events["start"]["setup"], events["end"]["teardown"]
    want = ["imports", "index", "run_folder", "loaders", "model", "feature_cache", "assemble", "open", "total"]
    assert list(setup) == want
    want = ["evaluation", "checkpoints", "final_state", "report", "exports", "checkpoint_write", "tensorboard", "total"]
    assert list(teardown) == want
    for phases in (setup, teardown):
        assert all(v >= 0 for v in phases.values())
        assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"), abs=1e-3)
    assert setup["imports"] > 0.5  # torch and torchvision are imported in it
    assert events["start"]["time"] <= events["eval"]["time"] <= events["end"]["time"]

    p = run_cli(
        "eval",
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--data",
        str(shapes4 / "val"),
        "--out",
        str(tmp_path / "ev"),
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--device",
        "cpu",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    train_m = json.loads((run_dir / "metrics.json").read_text())
    eval_m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert eval_m["confusion_matrix"] == train_m["confusion_matrix"]

    out = tmp_path / "preds.csv"
    p = run_cli(
        "predict",
        "--checkpoint",
        str(run_dir / "last.pt"),
        "--input",
        str(shapes4 / "val"),
        "--out",
        str(out),
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and set(rows[0]) == {"path", "label", "probability"}
    assert all(r["label"] in train_m["classes"] and 0 < float(r["probability"]) <= 1 for r in rows)
    # predict's labels agree with the confusion matrix's predicted-class totals
    predicted = [sum(col) for col in zip(*train_m["confusion_matrix"])]
    assert [sum(r["label"] == c for r in rows) for c in train_m["classes"]] == predicted

    # resuming a finished run continues from its saved step and trains no further
    p = run_cli(
        "train", "--config", str(cfg), *FAST, f"--run.out_dir={tmp_path / 'runs'}", "--resume", str(run_dir / "last.pt")
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr and "at epoch 1" in p.stderr


def test_python_module_entry_and_help() -> None:
    p = run_cli("--help")
    assert p.returncode == 0 and all(c in p.stdout for c in ("train", "eval", "predict", "demo"))
    p = subprocess.run(
        [sys.executable, "-m", "fastft.cli", "eval", "--checkpoint", "nope.pt", "--data", "."],
        capture_output=True,
        text=True,
    )
    _one_line_error(p, "nope.pt")  # python -m fastft.cli is the same entry point


def test_demo_config_is_valid_and_small(tmp_path) -> None:
    from fastft.demo import demo_config

    for pre in (True, False):
        cfg = demo_config(Path(tmp_path), str(tmp_path), pretrained=pre)
        assert cfg.model.name == "resnet18" and cfg.data.image_size == 64
        assert cfg.model.freeze == ("backbone" if pre else "none")


# --------------------------------------------------------------------------------------------------------------------
# eval / predict options are range-checked like train's config (in-process: the same code path as the CLI)


def _in_process(*args: str) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reliability"))
    from _reliability import cli, error_line

    rc, err = cli(*args)
    assert rc == 2, err[-2000:]
    return error_line(err)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--batch-size", "0"), ("--workers", "-1"), ("--device", "cuda:99"), ("--device", "gpu")],
)
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_options_are_range_checked(tmp_path, command, option, value) -> None:
    # Checked before the checkpoint is opened: it does not exist, and the error still names the option.
    place = (
        ["--data", str(tmp_path)] if command == "eval" else ["--input", str(tmp_path), "--out", str(tmp_path / "p.csv")]
    )
    line = _in_process(command, "--checkpoint", str(tmp_path / "none.pt"), *place, option, value)
    assert option in line and value in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_cuda_device_that_is_not_there_is_one_line_for_train(tmp_path) -> None:
    line = _in_process("train", f"--data.root={tmp_path}", "--run.device=cuda:99", f"--run.out_dir={tmp_path}")
    assert "run.device" in line and "cuda:99" in line, line


def test_eval_and_predict_take_a_run_file_and_overrides_with_the_flags_as_aliases(tmp_path, monkeypatch) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "reliability"))
    from _reliability import cli

    import fastft.api

    seen: dict[str, dict] = {}
    monkeypatch.setattr(fastft.api, "evaluate", lambda *a, **k: seen.setdefault("eval", k))
    monkeypatch.setattr(fastft.api, "predict", lambda *a, **k: seen.setdefault("predict", k) and "p.csv")
    run_file = tmp_path / "run.toml"
    run_file.write_text(
        '[data]\nbatch_size = 16\neval_batch_size = 12\nworkers = 3\non_bad_file = "skip"\n'
        '[precision]\ndtype = "bf16"\n'
    )
    where = ["--checkpoint", "c.pt", "--data", str(tmp_path)]
    assert cli("eval", *where, "--config", str(run_file), "--data.workers=0", "--batch-size", "7")[0] == 0
    assert {k: seen["eval"][k] for k in ("batch_size", "workers", "precision", "loader", "device")} == {
        "batch_size": 7,  # the flag wins over the file
        "workers": 0,  # the override wins over the file
        "precision": "bf16",
        "loader": "auto",  # the file's (default) value: auto picks torch on CPU
        "device": "auto",
    }
    assert cli("predict", "--checkpoint", "c.pt", "--input", "x", "--out", "p.csv", "--config", str(run_file))[0] == 0
    assert seen["predict"] == {"batch_size": 12, "workers": 3, "device": "auto", "on_bad_file": "skip"}
    args = (
        "--checkpoint",
        "c.pt",
        "--input",
        "x",
        "--out",
        "p.csv",
        "--config",
        str(run_file),
        "--on-bad-file",
        "error",
    )
    seen.clear()
    assert cli("predict", *args)[0] == 0
    assert seen["predict"]["on_bad_file"] == "error"  # the flag wins over the file


def test_eval_overrides_are_validated_like_train(tmp_path) -> None:
    where = ["--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path)]
    assert "data.batch_size: must be finite and >= 1, got 0" in _in_process("eval", *where, "--data.batch_size=0")
    assert "data.loader: expected one of" in _in_process("eval", *where, "--data.loader=spark")
    assert "unknown config key 'data.workrs' (did you mean data.workers?)" in _in_process(
        "eval", *where, "--data.workrs=1"
    )
