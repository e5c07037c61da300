"""End-to-end fine-tuning through the Python API: what trains, what must not change, resume, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import run_interrupted, tiny_config
from safetensors.torch import load_file

from fastft.data.loaders import dali_available
from fastft.train import finetune


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    """A local 'pretrained' resnet18 (random, 1000-class head) with non-trivial BatchNorm statistics."""
    torch.manual_seed(123)
    m = torchvision.models.resnet18()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(m.state_dict(), path)
    return path


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


def test_linear_probe_leaves_backbone_and_bn_buffers_bit_identical(shapes4, backbone_file, tmp_path) -> None:
    cfg = tiny_config(shapes4, tmp_path, model__weights=str(backbone_file), model__freeze="backbone")
    result = finetune(cfg)
    before = torch.load(backbone_file, weights_only=True)
    after = load_file(result.paths["model_export"])
    assert set(after) - set(before) == set() and {k for k in before if k.startswith("fc.")} == {"fc.weight", "fc.bias"}
    changed = _changed({k: v for k, v in before.items() if not k.startswith("fc.")}, after)
    assert changed == set(), f"frozen tensors changed: {sorted(changed)[:5]}"
    assert after["fc.weight"].shape == (4, 512)
    assert result.steps == 2 * (48 // 8)


def test_until_layer3_trains_exactly_layer4_and_head(shapes4, backbone_file, tmp_path) -> None:
    import matplotlib.pyplot as plt

    cfg = tiny_config(
        shapes4,
        tmp_path,
        model__weights=str(backbone_file),
        model__freeze="until:layer3",
        optim__epochs=1,
        log__tensorboard=False,
    )
    open_figures = plt.get_fignums()
    result = finetune(cfg)
    assert plt.get_fignums() == open_figures  # no figure left open (pyplot keeps them) with TensorBoard off
    before = torch.load(backbone_file, weights_only=True)
    after = load_file(result.paths["model_export"])
    changed = _changed({k: v for k, v in before.items() if not k.startswith("fc.")}, after)
    layer4 = {k for k in before if k.startswith("layer4.") and not k.endswith("num_batches_tracked")}
    # Every layer4 weight and (trainable, train-mode) BN buffer moved; nothing before layer4 did.
    assert changed - {k for k in before if k.endswith("num_batches_tracked")} == layer4
    assert all(k.startswith("layer4.") for k in changed)


def test_outputs_of_a_run(shapes4, tmp_path) -> None:
    import matplotlib.pyplot as plt

    open_figures = plt.get_fignums()
    result = finetune(tiny_config(shapes4, tmp_path, optim__epochs=1))
    assert plt.get_fignums() == open_figures
    d = result.run_dir
    for name in (
        "config.toml",
        "events.jsonl",
        "metrics.json",
        "confusion_matrix.png",
        "last.pt",
        "best.pt",
        "model.safetensors",
        "head.safetensors",
        "head.json",
    ):
        assert (d / name).is_file(), name
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((d / "metrics.json").read_text())
    assert metrics["num_samples"] == 24 and sum(map(sum, metrics["confusion_matrix"])) == 24
    assert [r["class"] for r in metrics["per_class"]] == ["checker", "circle", "cross", "diamond"]
    assert metrics["confusion_matrix"] == result.metrics["confusion_matrix"]
    assert {k: v for k, v in metrics.items() if isinstance(v, float)} == pytest.approx(
        {k: v for k, v in result.metrics.items() if isinstance(v, float)}
    )
    events = [json.loads(line) for line in (d / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    # in-process: the set-up starts at finetune() (no command-line imports), the teardown ends at the end event
    assert next(iter(result.phases["setup"])) == "index" and result.phases["teardown"] == events[-1]["teardown"]
    assert sorted(result.timings) == [f"epoch{i}" for i in range(len(result.timings))]  # epochs only
    head = load_file(d / "head.safetensors")
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (4, 512)


def test_existing_run_folder_is_refused_before_training(shapes4, tmp_path) -> None:
    from fastft.errors import ConfigError

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        finetune(tiny_config(shapes4, tmp_path))
    assert (tmp_path / "t" / "precious.txt").read_text() == "keep me"


def test_grad_accumulation_matches_the_larger_batch(shapes4, tmp_path) -> None:
    a = finetune(tiny_config(shapes4, tmp_path, run__name="a", data__batch_size=8, optim__epochs=1))
    b = finetune(
        tiny_config(shapes4, tmp_path, run__name="b", data__batch_size=4, optim__grad_accum=2, optim__epochs=1)
    )
    wa, wb = load_file(a.paths["head_export"]), load_file(b.paths["head_export"])
    assert a.steps == b.steps == 6
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "loader",
    [
        "torch",
        pytest.param(
            "dali",
            marks=[pytest.mark.dali, pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")],
        ),
    ],
)
def test_resume_after_interruption_continues_from_saved_step(shapes4, tmp_path, monkeypatch, loader) -> None:
    """Interrupt at step 5 (last.pt saved at step 4, mid-epoch); resume; final weights equal an uninterrupted run.
    With augmentation on, so the resumed run must also repeat the random crops and flips."""
    common = dict(
        data__loader=loader,
        optim__epochs=2,
        data__augment=True,
        checkpoint__every_steps=2,
        model__freeze="until:layer3",
        optim__warmup_steps=2,
    )
    full = finetune(tiny_config(shapes4, tmp_path, run__name="full", **common))

    run_interrupted(tiny_config(shapes4, tmp_path, run__name="cut", **common), monkeypatch, at_step=5)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (4, 0, 4)

    resumed = finetune(tiny_config(shapes4, tmp_path, run__name="cut", checkpoint__resume="auto", **common))
    assert resumed.steps == full.steps == 12
    wf, wr = load_file(full.paths["model_export"]), load_file(resumed.paths["model_export"])
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed.metrics["top1"] == full.metrics["top1"]
    events = [json.loads(x) for x in (tmp_path / "cut" / "events.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert starts[-1]["resumed_from"].endswith("last.pt")


def test_binary_task_reports_auroc_matching_predictions(shapes2, tmp_path) -> None:
    from sklearn.metrics import roc_auc_score

    from fastft.api import predict

    result = finetune(tiny_config(shapes2, tmp_path, optim__epochs=2))
    assert 0.0 <= result.metrics["auroc"] <= 1.0 and "average_precision" in result.metrics
    assert "top5" not in result.metrics
    csv_path = predict(result.paths["last"], shapes2 / "val", tmp_path / "preds.csv", workers=0, device="cpu")
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
    classes = result.metrics["classes"]
    y = [classes.index(Path(p).parent.name) for p, _, _ in rows]
    p1 = [float(p) if lbl == classes[1] else 1 - float(p) for _, lbl, p in rows]
    assert len(rows) == 16
    assert roc_auc_score(y, p1) == pytest.approx(result.metrics["auroc"], abs=1e-4)


def test_evaluate_api_reproduces_the_run_report(shapes4, tmp_path) -> None:
    from fastft.api import evaluate

    result = finetune(tiny_config(shapes4, tmp_path, optim__epochs=1))
    ev = evaluate(
        result.paths["last"], shapes4 / "val", out_dir=tmp_path / "ev", workers=0, device="cpu", precision="fp32"
    )
    for k in ("top1", "f1_macro", "loss", "precision_weighted"):
        assert ev.metrics[k] == pytest.approx(result.metrics[k], abs=1e-6), k
    assert ev.metrics["confusion_matrix"] == result.metrics["confusion_matrix"]
    assert (tmp_path / "ev" / "metrics.json").is_file()
