"""model.source=hf through the real run (fastft.train.finetune and the CLI) on a tiny BERT built in tiny_bert.py:
what trains, what must not change, the report's counts, exact resume, DDP evaluation on uneven shards, bad input."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_torchrun
from safetensors.torch import load_file
from tiny_bert import make_tiny_bert

import fastft.api as fastft_api
from fastft.config import FinetuneConfig
from fastft.train import finetune

# Three classes, each named by its own words of the tiny vocabulary (tiny_bert.WORDS), with shared fillers.
GROUPS = {"animal": ["cat", "dog", "bird", "fish"], "colour": ["red", "blue", "green"], "shop": ["food", "price"]}
FILLERS = ["the", "a", "very", "and"]


def write_rows(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        for i in range(n):
            label = list(GROUPS)[i % len(GROUPS)]
            words = [rng.choice(GROUPS[label]) for _ in range(rng.randint(1, 2))]
            words += [rng.choice(FILLERS) for _ in range(rng.randint(0, 1))]
            rng.shuffle(words)
            w.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT whose untrained pooled output separates the classes (initializer_range 0.2), 60 train rows and
    30 val rows (10 per class)."""
    root = tmp_path_factory.mktemp("text_train")
    return {
        "bert": make_tiny_bert(root / "bert", init_range=0.2),
        "train": write_rows(root / "train.csv", 60, seed=0),
        "val": write_rows(root / "val.csv", 30, seed=1),
        "root": root,
    }


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache


def text_config(data: dict[str, Path], out: Path, **settings) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.source, cfg.model.name = "hf", str(data["bert"])
    cfg.data.root, cfg.data.train_list, cfg.data.val_list = "", str(data["train"]), str(data["val"])
    cfg.data.max_length, cfg.data.batch_size = 16, 8
    cfg.precision.dtype, cfg.compile.target = "fp32", "none"
    cfg.optim.name, cfg.optim.lr, cfg.optim.epochs = "adamw", 0.05, 6
    cfg.run.out_dir, cfg.run.name, cfg.run.device = str(out), "t", "cpu"
    cfg.log.progress, cfg.log.tensorboard, cfg.log.every_steps = False, False, 1
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


def _step_losses(run: Path) -> list[float]:
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "step"]


@pytest.mark.parametrize(
    ("freeze", "lr"),
    # the cut between layers also trains in the default suite's resume test
    [("backbone", 0.2), pytest.param("until:layer.0", 0.003, marks=pytest.mark.slow), ("none", 0.003)],
)
def test_text_run_trains_and_keeps_frozen_weights(text_data, tmp_path, freeze, lr) -> None:
    """Loss falls and val macro-F1 is well above chance (1/3) for a linear probe (the pooled-output prefix), a cut
    between encoder layers and the whole model; the frozen weights (dropout 0.1, trained in train mode) are
    bit-identical to the folder's; the confusion matrix counts every val row once."""
    result = finetune(text_config(text_data, tmp_path, model__freeze=freeze, optim__lr=lr))
    report = result.metrics
    assert report["f1_macro"] > 0.5, report["confusion_matrix"]  # chance: 1/3
    assert report["loss"] < math.log(3)
    losses = _step_losses(result.run_dir)
    assert len(losses) == result.steps == 6 * (60 // 8)
    # The running mean over the last epoch's steps is below the first step's loss.
    assert losses[-1] < losses[0]
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.sum() == report["num_samples"] == 30 and cm.sum(1).tolist() == [10, 10, 10]
    assert report["classes"] == ["animal", "colour", "shop"]
    folder = load_file(text_data["bert"] / "model.safetensors")
    trained = load_file(result.paths["model_export"])
    frozen = {
        "backbone": lambda k: True,
        "until:layer.0": lambda k: k.startswith(("embeddings.", "encoder.layer.0.")),
        "none": lambda k: False,
    }[freeze]
    changed = {k for k, v in folder.items() if not torch.equal(trained[f"hf.bert.{k}"], v)}
    assert {k for k in folder if frozen(k)}.isdisjoint(changed)
    assert {k for k in folder if not frozen(k)} <= changed | {k for k in folder if "position_ids" in k}
    # eval / predict / export rebuild the model from last.pt (a probe checkpoint: from the folder + the head): the
    # run's final weights, every tensor
    model, _ = fastft_api.load_trained(result.paths["last"], torch.device("cpu"))
    rebuilt = model.state_dict()
    assert set(trained) <= set(rebuilt)
    assert all(torch.equal(rebuilt[k], v) for k, v in trained.items())


def test_the_run_reads_data_max_length(text_data, tmp_path) -> None:
    """data.max_length reaches the model: 65 tokens is more than the tiny BERT's 64 positions, refused in one line
    before the run folder is made."""
    from fastft.errors import ModelError

    with pytest.raises(ModelError, match=r"^data\.max_length: 65 is more than .* \(64 positions\)$"):
        finetune(text_config(text_data, tmp_path / "runs", data__max_length=65))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("features__cache", "memory", "features.cache: a text model caches the pooled output of a frozen encoder only"),
        ("data__loader", "synthetic", "data.loader: synthetic loads images"),
        ("head__sweep_lr", [0.1, 0.01], "head.sweep_lr: a head sweep needs a linear probe"),
    ],
)
def test_what_the_text_path_does_not_do_is_one_line(text_data, tmp_path, key, value, message) -> None:
    from fastft.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{message}"):
        finetune(text_config(text_data, tmp_path / "runs", model__freeze="none", **{key: value}))
    assert not (tmp_path / "runs").exists()


def test_text_resume_equals_the_uninterrupted_run(text_data, tmp_path, monkeypatch) -> None:
    """Interrupted after step 8 (last.pt at step 8, mid-epoch 2), resumed: the weights equal the uninterrupted run's
    (dropout in the trained layer draws from the restored RNG)."""
    from conftest import run_interrupted

    common = dict(
        model__freeze="until:layer.0",
        optim__lr=0.003,
        optim__epochs=2,
        checkpoint__every_steps=4,
        optim__warmup_steps=2,
    )
    full = finetune(text_config(text_data, tmp_path, run__name="full", **common))
    run_interrupted(text_config(text_data, tmp_path, run__name="cut", **common), monkeypatch, at_step=10)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (8, 1, 1)

    resumed = finetune(text_config(text_data, tmp_path, run__name="cut", checkpoint__resume="auto", **common))
    assert resumed.steps == full.steps == 14
    wf, wr = load_file(full.paths["model_export"]), load_file(resumed.paths["model_export"])
    assert wf.keys() == wr.keys()
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed.metrics["confusion_matrix"] == full.metrics["confusion_matrix"]
    best = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    assert best["meta"]["transform"]["max_length"] == 16


@pytest.mark.slow
@pytest.mark.parametrize(
    ("freeze", "lr", "backend"), [("backbone", "0.05", "ddp"), ("until:layer.0", "0.003", "deepspeed")]
)
def test_ddp_text_run_reports_as_one_process(text_data, tmp_path, freeze, lr, backend) -> None:
    """2 ranks x batch 4 == one process x batch 8 (the same global batches; a linear probe under DDP, and a cut
    between layers whose wrapped part takes hidden states + mask under DeepSpeed ZeRO-2), evaluated on 101 val rows
    (shards of 51 and 50): the same confusion matrix, every row counted once, the same metrics. Without dropout: each
    rank draws its own dropout masks, so with dropout the two runs would train differently."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'fastft[deepspeed]')")
    val = write_rows(tmp_path / "val101.csv", 101, seed=3)
    bert = make_tiny_bert(tmp_path / "bert", init_range=0.2, dropout=0.0)
    common = [
        "train",
        "--model.source=hf",
        f"--model.name={bert}",
        f"--model.freeze={freeze}",
        "--data.root=",
        f"--data.train_list={text_data['train']}",
        f"--data.val_list={val}",
        "--data.max_length=16",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--optim.name=adamw",
        f"--optim.lr={lr}",
        "--optim.epochs=3",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--run.device=cpu",
        f"--run.out_dir={tmp_path}",
    ]
    env = {"FASTFT_CACHE": str(tmp_path / "cache")}
    one = run_cli(*common, "--data.batch_size=8", "--run.name=one", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    ds = ["--parallel.backend=deepspeed", "--parallel.zero_stage=2"] if backend == "deepspeed" else []
    two = run_torchrun(2, *common, *ds, "--data.batch_size=4", "--run.name=two", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    ref, got = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    events = [json.loads(x) for x in (tmp_path / "two" / "events.jsonl").read_text().splitlines()]
    assert events[0]["world_size"] == 2
    assert got["num_samples"] == ref["num_samples"] == 101
    assert got["confusion_matrix"] == ref["confusion_matrix"]
    assert sum(map(sum, got["confusion_matrix"])) == 101
    for k, v in ref.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, abs=1e-6 if backend == "ddp" else 1e-5), k
    if backend == "deepspeed":  # ZeRO-2 writes each rank's optimizer shard beside the checkpoint
        assert (tmp_path / "two" / "deepspeed").is_dir()


def _cli_train(data: dict[str, Path], out: Path, *extra: str):
    return run_cli(
        "train",
        "--model.source=hf",
        f"--model.name={data['bert']}",
        "--data.root=",
        "--data.max_length=16",
        "--log.progress=false",
        "--run.device=cpu",
        f"--run.out_dir={out}",
        *extra,
        env={"FASTFT_CACHE": str(out.parent / "cache")},
    )


BAD = {
    "no_label_column": (
        "text,other\nthe cat,animal\n",
        "train",
        "{file}:1: expected a header naming the columns text,label",
    ),
    "unknown_val_label": (
        "text,label\nthe cat,animal\nthe dog,plant\n",
        "val",
        "{file}:3: label 'plant' does not occur",
    ),
    "dali_loader": (None, "", "data.loader: dali loads images; model.source=hf reads text"),
}


@pytest.mark.parametrize(
    "case",
    [
        "no_label_column",
        pytest.param("unknown_val_label", marks=pytest.mark.slow),
        pytest.param("dali_loader", marks=pytest.mark.slow),
    ],
)
def test_bad_text_input_is_one_line(text_data, tmp_path, case) -> None:
    """A missing label column, a val label train does not have, data.loader=dali: one line naming the file and line
    (or the key), exit 2, and no run folder."""
    content, role, expected = BAD[case]
    files = {"train": text_data["train"], "val": text_data["val"]}
    bad = tmp_path / f"{case}.csv"
    if content is not None:
        bad.write_text(content)
        files[role] = bad
    extra = ["--data.loader=dali"] if case == "dali_loader" else []
    out = tmp_path / "runs"
    p = _cli_train(text_data, out, f"--data.train_list={files['train']}", f"--data.val_list={files['val']}", *extra)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("fastft: error:")]
    assert len(errors) == 1 and expected.format(file=bad) in errors[0], p.stderr
    assert not out.exists()  # refused before the run folder is made
