"""The head sweep on a text linear probe: a bank of classifiers on the frozen encoder's pooled output (here from the
feature cache), each trained as a plain run at its LR, and the best one kept as the model's classifier."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, run_torchrun
from safetensors.torch import load_file
from test_text_train import text_config, text_data, write_rows  # noqa: F401  (text_data: a fixture)
from tiny_bert import make_tiny_bert

from fastft.train import finetune

LRS = [0.02, 0.2]


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))  # never the user's ~/.cache


def test_a_cached_text_sweep_trains_each_head_as_a_plain_run(text_data, tmp_path) -> None:
    """Two heads in train mode with BERT's classifier dropout (0.1): the kept head, the best by f1_macro, has the
    weights and the report of a plain run at its LR (same seed: the bank draws the one dropout mask per step a lone
    head draws), and it is the exported classifier. (tests/test_sweep.py checks every head of a dropout bank.)"""
    common = dict(model__freeze="backbone", optim__epochs=2, features__cache="memory", features__dtype="fp32")
    sweep = finetune(text_config(text_data, tmp_path, run__name="sweep", head__sweep_lr=LRS, **common))
    rows = sweep.metrics["sweep"]
    assert [r["lr"] for r in rows] == LRS
    assert rows[0]["f1_macro"] != rows[1]["f1_macro"]  # the choice below is a real one
    best = max(range(len(LRS)), key=lambda i: rows[i]["f1_macro"])
    assert sweep.metrics["sweep_best"] == best
    bank = torch.load(sweep.paths["last"], weights_only=True)["sweep_bank"]
    alone = finetune(text_config(text_data, tmp_path, run__name="alone", optim__lr=LRS[best], **common))
    head = load_file(alone.paths["head_export"])
    for k, v in head.items():  # the bank's keys: heads.i.1.* (Sequential(dropout, classifier))
        torch.testing.assert_close(bank[f"heads.{best}.1.{k}"], v, atol=1e-5, rtol=1e-4)
    kept, ref = sweep.metrics, alone.metrics
    assert kept["confusion_matrix"] == ref["confusion_matrix"]
    for k in ("top1", "f1_macro", "precision_macro", "recall_macro"):
        assert kept[k] == pytest.approx(ref[k], abs=1e-6), k
    assert kept["loss"] == pytest.approx(ref["loss"], abs=1e-4)
    exported = load_file(sweep.paths["head_export"])
    assert torch.equal(exported["weight"], bank[f"heads.{best}.1.weight"])


@pytest.mark.slow
def test_a_text_sweep_on_two_ranks_reports_as_one_process(text_data, tmp_path) -> None:
    """2 ranks x batch 4 under DDP == one process x batch 8 for a cached text sweep (without dropout, whose masks each
    rank draws on its own), evaluated on 31 val rows (shards of 16 and 15): every head's row of the sweep table
    (1e-6), the same kept head and confusion matrix."""
    bert = make_tiny_bert(tmp_path / "bert", init_range=0.2, dropout=0.0)
    val = write_rows(tmp_path / "val31.csv", 31, seed=1)
    common = [
        "train",
        "--model.source=hf",
        f"--model.name={bert}",
        "--model.freeze=backbone",
        "--data.root=",
        f"--data.train_list={text_data['train']}",
        f"--data.val_list={val}",
        "--data.max_length=16",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--optim.name=adamw",
        "--optim.lr=0.05",
        "--optim.epochs=2",
        f"--head.sweep_lr=[{LRS[0]},{LRS[1]}]",
        "--features.cache=memory",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--run.device=cpu",
        f"--run.out_dir={tmp_path}",
    ]
    env = {"FASTFT_CACHE": str(tmp_path / "cache")}
    one = run_cli(*common, "--data.batch_size=8", "--run.name=one", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun(2, *common, "--data.batch_size=4", "--run.name=two", env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    ref, got = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    assert got["num_samples"] == ref["num_samples"] == 31
    assert got["sweep_best"] == ref["sweep_best"]
    assert got["confusion_matrix"] == ref["confusion_matrix"]
    for a, b in zip(got["sweep"], ref["sweep"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)
