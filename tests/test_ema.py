"""optim.ema_decay / ema_every: the EMA of the trainable weights (torch's AveragedModel), its report, checkpoints,
exact resume and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import fastft
from fastft.api import load_trained
from fastft.checkpoint import atomic_save
from fastft.config import FinetuneConfig
from fastft.ema import Ema
from fastft.errors import ConfigError
from fastft.export import export_model
from fastft.report import format_table
from fastft.train import finetune

# --------------------------------------------------------------------------------------------------------------------
# The average itself, against a plain loop


def _tiny() -> tuple[nn.Sequential, nn.Sequential]:
    """(model, trainable suffix): a frozen Linear, then BatchNorm (its running statistics train) + ReLU + Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    return model, model[1:]  # the slice shares the modules: names differ ("0.weight" is the model's "1.weight")


@pytest.mark.parametrize("every", [1, 3])
def test_ema_equals_a_hand_rolled_ema_of_the_weights_and_batchnorm_statistics(every: int) -> None:
    """10 SGD steps in train mode; the reference is a loop over copies of the trainable tensors: the first average
    copies the weights, later ones take decay * ema + (1 - decay) * weights (in float64), at steps every, 2*every..."""
    decay = 0.8
    model, suffix = _tiny()
    ema = Ema(suffix, model, decay=decay, every=every)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    trained = ["1.weight", "1.bias", "1.running_mean", "1.running_var", "3.weight", "3.bias"]
    ref: dict[str, torch.Tensor] = {}
    model.train()
    for step in range(1, 11):
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        ema.step(step)
        if step % every == 0:
            now = {k: v.detach().double().clone() for k, v in model.state_dict().items() if k in trained}
            ref = now if not ref else {k: decay * ref[k] + (1 - decay) * now[k] for k in trained}
    saved = ema.state_dict()
    assert int(saved["n_averaged"]) == 10 // every
    assert set(saved["state"]) == {*trained, "1.num_batches_tracked"}  # the frozen Linear is not held
    raw = model.state_dict()
    for k in trained:
        torch.testing.assert_close(saved["state"][k].double(), ref[k], rtol=1e-6, atol=1e-7)
        assert (saved["state"][k] - raw[k]).abs().max() > 1e-3, k  # the average is not the raw weights
    # The averaged module computes with the averaged tensors (its outputs are the reference model's).
    check = _tiny()[0]
    check.load_state_dict({**raw, **{k: v.float() for k, v in ref.items()}})
    x = torch.randn(5, 4)
    torch.testing.assert_close(ema.module.eval()(model[0](x)), check.eval()(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optim.ema_decay": 1.0}, "optim.ema_decay: must be in [0.0, 1.0), got 1.0"),
        ({"optim.ema_decay": -0.1}, "optim.ema_decay: must be in [0.0, 1.0), got -0.1"),
        ({"optim.ema_every": 0}, "optim.ema_every"),
        ({"checkpoint.best_metric": "ema/f1_macro"}, "'ema/f1_macro' needs optim.ema_decay > 0"),
        ({"optim.ema_decay": 0.9, "head.sweep_lr": [0.1, 0.01]}, "not supported with head.sweep_lr"),
        ({"optim.ema_decay": 0.9, "optim.unfreeze": ["2:layer4"]}, "not supported with optim.unfreeze"),
        ({"optim.ema_decay": 0.9, "parallel.backend": "deepspeed"}, "not supported with parallel.backend=deepspeed"),
    ],
)
def test_ema_config_is_checked(changes: dict, message: str) -> None:
    cfg = FinetuneConfig()
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert message in str(e.value)


# --------------------------------------------------------------------------------------------------------------------
# A run: report, best.pt, export, exact resume


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("w") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _cfg(root: Path, out: Path, weights: Path, **kw):
    """resnet18 from a weights file; layer4.1 (convs + BatchNorm) and fc train, 4.7M of 11.2M parameters (probe
    checkpoints). 2 epochs x 2 steps, a step save at step 3 (mid-epoch 2); the EMA (decay 0.5: far from the raw
    weights after 4 steps) picks best.pt."""
    return tiny_config(
        root,
        out,
        model__weights=str(weights),
        model__freeze="until:layer4.0",
        data__batch_size=16,
        optim__ema_decay=0.5,
        checkpoint__every_steps=3,
        checkpoint__best_metric="ema/f1_macro",
        **kw,
    )


@pytest.fixture(scope="module")
def full(shapes2, weights_file, module_tmp):
    """The uninterrupted run."""
    return finetune(_cfg(shapes2, module_tmp("ema"), weights_file, run__name="full"))


@pytest.fixture(scope="module")
def resumed(full, shapes2, weights_file):
    """(the run stopped after step 3 (mid-epoch 2): its last.pt, then the run resumed from it)."""
    from fastft.parallel.backend import LocalBackend

    out = full.run_dir.parent
    real, calls = LocalBackend.step, {"n": 0}

    def stop_after_step_3(self, boundary=True):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Stop
        return real(self, boundary)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "step", stop_after_step_3)
        with pytest.raises(_Stop):
            finetune(_cfg(shapes2, out, weights_file, run__name="cut"))
    cut = torch.load(out / "cut" / "last.pt", map_location="cpu", weights_only=True)
    return cut, finetune(_cfg(shapes2, out, weights_file, run__name="cut", checkpoint__resume="auto"))


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # two more runs (~20 s of CPU)
def test_an_interrupted_run_resumed_mid_epoch_ends_bit_identical_ema_included(full, resumed) -> None:
    cut, resumed = resumed
    assert cut["step"] == 3 and cut["batch"] == 1 and int(cut["ema"]["n_averaged"]) == 3  # a mid-epoch step save
    a, b = _ckpt(full.run_dir / "last.pt"), _ckpt(resumed.run_dir / "last.pt")
    assert int(a["ema"]["n_averaged"]) == int(b["ema"]["n_averaged"]) == 4
    assert set(a["ema"]["state"]) == set(b["ema"]["state"]) == set(a["model"])  # the probe's trainable part only
    for k in a["ema"]["state"]:
        assert torch.equal(a["ema"]["state"][k], b["ema"]["state"][k]), k
        assert torch.equal(a["model"][k], b["model"][k]), k
    ea, eb = load_file(full.paths["model_export"]), load_file(resumed.paths["model_export"])
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    scalars = {k: v for k, v in full.metrics.items() if isinstance(v, float)}
    assert "ema/f1_macro" in scalars and "ema/loss" in scalars
    assert {k: resumed.metrics[k] for k in scalars} == scalars


def test_best_metric_ema_keeps_the_ema_weights_in_best_pt_and_the_export(full, shapes2, tmp_path) -> None:
    best, last = _ckpt(full.run_dir / "best.pt"), _ckpt(full.run_dir / "last.pt")
    assert best["best"]["metric"] == "ema/f1_macro" and "ema" in best and "model" in best  # both, and which won
    export = load_file(full.paths["model_export"])
    meta = json.loads((full.run_dir / "model.json").read_text())
    assert meta["ema_weights"] is True
    floats = {k: v for k, v in last["ema"]["state"].items() if v.is_floating_point()}
    assert len(floats) == 12  # layer4.1: 2 convs, 2 BatchNorms (weight, bias, statistics); fc weight and bias
    for k, v in last["ema"]["state"].items():  # the export is the final state: the EMA's trainable tensors
        assert torch.equal(export[k], v), k
    for k, v in floats.items():
        assert not torch.equal(v, last["model"][k]), k  # and they are not the raw weights
    model, m = load_trained(full.run_dir / "best.pt", torch.device("cpu"))  # eval / predict / fastft export
    assert m["ema_weights"] is True
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best["ema"]["state"].items())
    written = export_model(full.run_dir / "best.pt", tmp_path, fmt="safetensors")  # `fastft export`
    exported = load_file(written[0])
    assert all(torch.equal(exported[k], v) for k, v in best["ema"]["state"].items())
    with safe_open(str(written[0]), framework="pt") as f:
        assert json.loads(f.metadata()["fastft"])["ema_weights"] is True
    # The report on the console and in metrics.json: both models.
    metrics = json.loads((full.run_dir / "metrics.json").read_text())
    assert metrics["ema/f1_macro"] == full.metrics["ema/f1_macro"] and "f1_macro" in metrics
    assert metrics["ema/loss"] != metrics["loss"]  # two models were evaluated
    # Each is the evaluation of its own weights: the EMA export, and last.pt read as a raw-weights checkpoint.
    val = {"device": "cpu", "precision": "fp32", "workers": 0}
    ema_eval = fastft.evaluate(full.paths["model_export"], shapes2 / "val", **val).metrics
    last["best"]["metric"] = "f1_macro"
    atomic_save(last, tmp_path / "raw.pt")
    raw_eval = fastft.evaluate(tmp_path / "raw.pt", shapes2 / "val", **val).metrics
    assert ema_eval["loss"] == pytest.approx(metrics["ema/loss"], abs=1e-6)
    assert raw_eval["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert ema_eval["confusion_matrix"] != raw_eval["confusion_matrix"] or ema_eval["loss"] != raw_eval["loss"]
    line = next(ln for ln in format_table(metrics).splitlines() if ln.split()[0] == "loss")
    assert line.split() == ["loss", f"{metrics['loss']:.4f}", "ema", f"{metrics['ema/loss']:.4f}"]


@pytest.mark.slow  # a CLI run and a 2-rank torchrun (~1 min of CPU)
def test_ddp_ema_equals_one_process_on_the_same_global_batch(shapes4, tmp_path) -> None:
    """2 ranks x batch 4 == one process x batch 8 (the DDP test's setting, a hidden head layer training): the EMA
    head that is exported (best_metric ema/f1_macro) and the ema/ report agree (fp32: the all-reduce order differs)."""
    from conftest import run_cli, run_torchrun

    common = [
        f"--data.root={shapes4}",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.workers=0",
        "--precision.dtype=fp32",
        "--log.progress=false",
        "--run.device=cpu",
        "--compile.target=none",
        "--optim.lr=0.05",
        "--run.seed=7",
        "--optim.epochs=2",
        "--model.freeze=backbone",
        "--model.head_hidden=16",
        "--optim.ema_decay=0.5",
        "--checkpoint.best_metric=ema/f1_macro",
        f"--run.out_dir={tmp_path}",
    ]
    for p in (
        run_cli("train", *common, "--data.batch_size=8", "--run.name=single", "--parallel.backend=none"),
        run_torchrun(2, "train", *common, "--data.batch_size=4", "--run.name=ddp"),
    ):
        assert p.returncode == 0, p.stderr[-3000:]
    single, ddp = (load_file(tmp_path / n / "head.safetensors") for n in ("single", "ddp"))
    raw = _ckpt(tmp_path / "single" / "last.pt")["model"]
    assert any(not torch.equal(single[k], raw[f"fc.{k}"]) for k in single)  # the export is the EMA head
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4, msg=k)
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("single", "ddp"))
    assert a["num_samples"] == b["num_samples"] == 24
    assert b["ema/loss"] == pytest.approx(a["ema/loss"], abs=1e-5) and b["ema/top1"] == a["ema/top1"]
