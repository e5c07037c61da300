"""model.source = "timm": the classifier from timm's contract, stages from group_matcher, freeze/split in train mode,
weights from a file or the local cache, preprocessing from timm's data config, the CLI end to end.

Tiny random-init models at 32 px (pretrained=False; nothing is downloaded)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import save_file

pytest.importorskip("timm", reason="timm is not installed (pip install 'fastft[timm]')")

import timm

from fastft.backbones import Backbone, build_backbone, preprocess_spec, trace_options
from fastft.backbones.freeze import freeze, in_head, is_frozen_bn
from fastft.backbones.split import split_model
from fastft.config import ModelConfig, OptimConfig
from fastft.errors import CheckpointError, ModelError
from fastft.optim import param_groups

# (model, classifier path from its pretrained_cfg, stage names from its coarse group_matcher). timm's test_* models
# are its own architectures (ConvNeXt, ViT) at a few hundred thousand parameters.
FAMILIES = [
    ("resnet10t", "fc", ["bn1", "layer1", "layer2", "layer3", "layer4"]),  # the stem: conv1 (3 convs) + bn1
    ("test_convnext", "head.fc", ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head.norm"]),
    ("mobilenetv3_small_050", "classifier", ["bn1", *(f"blocks.{i}" for i in range(6)), "conv_head"]),
    ("test_vit", "head", ["patch_embed", *(f"blocks.{i}" for i in range(5)), "norm"]),  # blocks.5 + norm: one group
]
NAMES = [f[0] for f in FAMILIES]


def _backbone(name: str, classes: int = 3, **kw) -> Backbone:
    torch.manual_seed(0)
    return build_backbone(ModelConfig(source="timm", name=name, weights="none", **kw), classes, image_size=32)


@pytest.mark.parametrize(("name", "head", "stage_names"), FAMILIES)
def test_head_and_stages_follow_timms_contract(name, head, stage_names) -> None:
    b = _backbone(name)
    assert isinstance(b, Backbone) and b.source == "timm" and b.head == head
    assert b.model.get_submodule(head) is b.model.get_classifier() and b.model.get_classifier().out_features == 3
    stages = b.stages()
    if stage_names is not None:
        assert [s.name for s in stages] == stage_names
    staged = [n for s in stages for n in s.params]
    non_head = [n for n, _ in b.model.named_parameters() if not in_head(n, head)]
    assert len(staged) == len(set(staged)) and sorted(staged) == sorted(non_head)  # each exactly once


def _expected_frozen(b: Backbone, policy: str) -> set[str]:
    names = [n for n, _ in b.model.named_parameters()]
    if policy == "none":
        return set()
    if policy == "backbone":
        return {n for n in names if not in_head(n, b.head)}
    stages = b.stages()
    upto = [s.name for s in stages].index(policy[len("until:") :])
    return {n for s in stages[: upto + 1] for n in s.params}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["backbone", "until", "none"])
def test_freeze_split_and_a_train_step(name, policy) -> None:
    b = _backbone(name)
    stages = b.stages()
    if policy == "until":
        policy = f"until:{stages[len(stages) // 2].name}"
    freeze(b.model, policy, head=b.head, stages=stages)
    named = dict(b.model.named_parameters())
    frozen = _expected_frozen(b, policy)
    assert {n for n, p in named.items() if not p.requires_grad} == frozen
    b.model.train()
    split = split_model(b.model, head=b.head, trace=trace_options(b.model))
    assert split.kind == {"backbone": "head", "none": "none"}.get(policy, "graph")
    bns = {n: m for n, m in b.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen_bn = {n for n, m in bns.items() if is_frozen_bn(m)}
    assert frozen_bn == {n for n in bns if f"{n}.weight" in frozen}  # BN frozen exactly with its parameters
    before = {k: v.clone() for k, v in b.model.state_dict().items()}

    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.SGD([p for p in named.values() if p.requires_grad], lr=0.5)
    F.cross_entropy(split.forward(x), y).backward()
    optimizer.step()
    after = b.model.state_dict()
    for n in bns:
        stats_same = torch.equal(before[f"{n}.running_mean"], after[f"{n}.running_mean"])
        assert stats_same == (n in frozen_bn), n  # frozen BN keeps its statistics in train mode; others update
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert not torch.equal(before[f"{b.head}.weight"], after[f"{b.head}.weight"])

    b.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(split.forward(x), b.model(x), rtol=1e-5, atol=1e-5)


def test_until_an_unknown_stage_names_the_stages() -> None:
    b = _backbone("test_convnext")
    with pytest.raises(ModelError, match=r"no module 'stage9'.*stages: stem, stages.0, stages.1"):
        freeze(b.model, "until:stage9", head=b.head, stages=b.stages())


def test_unknown_timm_name_and_weights_are_one_line() -> None:
    with pytest.raises(ModelError, match=r"unknown timm model 'resnet10x' \(did you mean .*resnet10t"):
        preprocess_spec(ModelConfig(source="timm", name="resnet10x"))
    with pytest.raises(ModelError, match=r"model.weights: 'IMAGENET1K_V1' for a timm model"):
        build_backbone(ModelConfig(source="timm", name="resnet10t", weights="IMAGENET1K_V1"), 3)


def test_layer_decay_counts_timms_stages() -> None:
    b = _backbone("test_convnext")
    names = [n for n, _ in b.model.named_parameters()]
    groups = param_groups(b.model, names, OptimConfig(layer_decay=0.5), head=b.head, stages=b.stages())
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(b.model.named_parameters())
    assert scale[id(named["head.fc.weight"])] == 1.0
    assert scale[id(named["head.norm.weight"])] == 0.5
    assert scale[id(named["stages.3.downsample.1.weight"])] == 0.5**2
    assert scale[id(named["stem.0.weight"])] == 0.5**6


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_and_export_round_trip(tmp_path, suffix) -> None:
    torch.manual_seed(5)
    trunk = timm.create_model("resnet10t", pretrained=False)  # its own 1000-class classifier
    path = tmp_path / f"trunk{suffix}"
    if suffix == ".safetensors":
        save_file(trunk.state_dict(), str(path))
    else:
        torch.save(trunk.state_dict(), path)
    cfg = ModelConfig(source="timm", name="resnet10t", weights=str(path), head_hidden=8)
    b = build_backbone(cfg, 3, image_size=32)
    got, want = b.model.state_dict(), trunk.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))
    assert got["fc.2.weight"].shape == (3, 8)  # a new head: hidden layer, then 3 classes

    (written,) = b.export(tmp_path / "export")
    assert json.loads(__import__("safetensors").safe_open(str(written), "pt").metadata()["fastft"])["source"] == "timm"
    again = build_backbone(ModelConfig(source="timm", name="resnet10t", weights=str(written), head_hidden=8), 3)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in got.items())  # the head included

    other = tmp_path / f"other{suffix}"
    save_file({"x": torch.zeros(1)}, str(other)) if suffix == ".safetensors" else torch.save(
        {"x": torch.zeros(1)}, other
    )
    with pytest.raises(CheckpointError, match="does not match resnet10t"):
        build_backbone(ModelConfig(source="timm", name="resnet10t", weights=str(other)), 3)


def test_vit_file_at_another_size_is_resampled_by_timm(tmp_path) -> None:
    torch.manual_seed(5)
    trunk = timm.create_model("test_vit", pretrained=False)  # 160 px: 10x10 patches + class token
    save_file(trunk.state_dict(), str(tmp_path / "vit.safetensors"))
    cfg = ModelConfig(source="timm", name="test_vit", weights=str(tmp_path / "vit.safetensors"))
    b = build_backbone(cfg, 3, image_size=32)
    assert trunk.pos_embed.shape[1] == 1 + 10 * 10 and b.model.pos_embed.shape[1] == 1 + 2 * 2
    assert torch.equal(b.model.blocks[3].attn.qkv.weight, trunk.blocks[3].attn.qkv.weight)
    assert b.model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_default_weights_come_from_the_local_cache_or_fail_in_one_line(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    cfg = ModelConfig(source="timm", name="resnet10t", weights="DEFAULT")
    with pytest.raises(ModelError, match=r"weights of resnet10t \(timm/resnet10t.c3_in1k\) are not in the local cache"):
        build_backbone(cfg, 3)
    torch.manual_seed(6)
    trunk = timm.create_model("resnet10t", pretrained=False)
    repo = tmp_path / "hub" / "models--timm--resnet10t.c3_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    save_file(trunk.state_dict(), str(repo / "snapshots" / "0123abc" / "model.safetensors"))
    got = build_backbone(cfg, 3).model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in trunk.state_dict().items() if not k.startswith("fc."))


def test_preprocessing_is_timms_data_config() -> None:
    cfg = ModelConfig(source="timm", name="vit_tiny_patch16_224", weights="none")
    spec = preprocess_spec(cfg, 32)  # crop_pct 0.9, mean/std 0.5: the eval resize is floor(32 / 0.9)
    assert (spec.crop_size, spec.resize_size, spec.interpolation) == (32, 35, "bicubic")
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)
    own = preprocess_spec(ModelConfig(source="timm", name="resnet10t"))  # trained at 176 px, crop_pct 0.875
    assert (own.crop_size, own.resize_size, own.interpolation) == (176, 201, "bicubic")
    built = _backbone("test_vit").preprocess()  # the built model's own config: crop_pct 0.95
    assert (built.crop_size, built.resize_size, built.mean) == (32, 33, (0.5, 0.5, 0.5))


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients() -> None:
    """Through the split training uses (blocks.2 onwards train): the checkpointed model is not traced, since a traced
    suffix would inline timm's checkpoint_seq and keep every activation."""
    grads, calls, kinds = [], [], []
    for on in (False, True):
        b = _backbone("test_vit", grad_checkpointing=on)
        freeze(b.model, "until:blocks.1", head=b.head, stages=b.stages())
        b.model.train()
        split = split_model(b.model, head=b.head, trace=trace_options(b.model))
        count, qkv = [], b.model.blocks[2].attn.qkv  # a leaf: both the traced graph and the model call it
        qkv.forward = lambda *a, run=qkv.forward, seen=count: seen.append(1) or run(*a)
        torch.manual_seed(2)
        split.forward(torch.randn(2, 3, 32, 32)).sum().backward()
        grads.append(qkv.weight.grad)
        calls.append(len(count))
        kinds.append(split.kind)
    assert kinds == ["graph", "none"]
    assert calls == [1, 2]  # the checkpointed block runs again in the backward pass (forward hooks do not see it)
    torch.testing.assert_close(grads[0], grads[1])


def test_finetune_then_evaluate_rebuilds_the_timm_model(shapes4, tmp_path) -> None:
    """The run's own final evaluation is the evaluation of the checkpoint it saved: eval rebuilds the timm model (not a
    torchvision resnet) from the checkpoint's recorded source, with the run's bicubic preprocessing."""
    from conftest import tiny_config

    import fastft
    from fastft.train import finetune

    cfg = tiny_config(
        shapes4, tmp_path, model__source="timm", model__name="test_convnext", model__freeze="until:stages.2"
    )
    cfg.optim.max_steps, cfg.optim.epochs, cfg.log.tensorboard = 2, 1, False
    result = finetune(cfg)
    meta = torch.load(result.paths["last"], weights_only=True)["meta"]
    assert (meta["source"], meta["transform"]["interpolation"], meta["transform"]["resize_size"]) == (
        "timm",
        "bicubic",
        33,
    )
    evaluated = fastft.evaluate(result.paths["last"], shapes4 / "val", device="cpu", precision="fp32", workers=0)
    assert evaluated.metrics["num_samples"] == 24
    assert evaluated.metrics["confusion_matrix"] == result.metrics["confusion_matrix"]
    assert abs(evaluated.metrics["loss"] - result.metrics["loss"]) < 1e-5


@pytest.mark.slow
def test_cli_train_then_eval_rebuilds_the_timm_model(shapes4, tmp_path) -> None:
    common = ["--data.workers=0", "--precision.dtype=fp32", "--log.progress=false", "--run.device=cpu"]
    p = run_cli(
        "train",
        f"--data.root={shapes4}",
        "--model.source=timm",
        "--model.name=resnet10t",
        "--model.weights=none",
        "--model.freeze=until:layer3",
        "--data.image_size=32",
        "--data.batch_size=16",
        "--optim.max_steps=2",
        "--log.tensorboard=false",
        f"--run.out_dir={tmp_path}",
        "--run.name=t",
        *common,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "t"
    trained = json.loads((run / "metrics.json").read_text())
    meta = torch.load(run / "last.pt", weights_only=True)["meta"]
    assert (meta["source"], meta["transform"]["interpolation"]) == ("timm", "bicubic")
    p = run_cli(
        "eval",
        "--checkpoint",
        str(run / "last.pt"),
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
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert evaluated["num_samples"] == 24
    assert evaluated["confusion_matrix"] == trained["confusion_matrix"]
    assert abs(evaluated["loss"] - trained["loss"]) < 1e-5
    out = tmp_path / "preds.csv"
    p = run_cli("predict", "--checkpoint", str(run / "last.pt"), "--input", str(shapes4 / "val"), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and all(0 < float(r["probability"]) <= 1 for r in rows)
    # the rebuilt timm model predicts what the run's evaluation counted: the confusion matrix's column totals
    predicted = [sum(col) for col in zip(*trained["confusion_matrix"])]
    assert [sum(r["label"] == c for r in rows) for c in trained["classes"]] == predicted


@pytest.mark.dali
def test_dali_and_torch_loaders_agree_on_a_timm_bicubic_preset(tmp_path) -> None:
    """efficientnet_b0's timm preset is bicubic (crop_pct 0.875): both loaders built from it give each sample's pixels
    within half an 8-bit level on average (the bound tests/data/test_dali_loader.py measured for torchvision's)."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'fastft[dali]')")
    import numpy as np
    from PIL import Image

    from fastft.config import DataConfig
    from fastft.data.loaders import build_loader
    from fastft.parallel.env import DistEnv

    spec = preprocess_spec(ModelConfig(source="timm", name="efficientnet_b0"), 29)
    assert (spec.interpolation, spec.crop_size, spec.resize_size) == ("bicubic", 29, 33)
    rng = np.random.default_rng(1)
    samples = []
    for i, (w, h) in enumerate([(40, 48), (56, 40), (53, 37), (300, 211), (97, 61), (20, 24), (33, 33)]):
        path = tmp_path / f"px{i}.jpg"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append((str(path), i))
    out = {}
    for kind in ("dali", "torch"):
        cfg = DataConfig(loader=kind, batch_size=4, workers=0, persistent_workers=False)
        loader = build_loader(samples, spec, cfg, train=False, seed=0, env=DistEnv())
        out[kind] = {int(y): x for xs, ys in loader for x, y in zip(xs, ys)}
    assert sorted(out["dali"]) == list(range(len(samples)))
    one_level = 1 / 255 / min(spec.std)
    per_sample = [float((out["dali"][i] - out["torch"][i]).abs().mean()) / one_level for i in range(len(samples))]
    assert max(per_sample) < 0.5, per_sample


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_zero2_on_two_ranks_trains_a_timm_model_as_one_process(shapes4, tmp_path) -> None:
    """test_convnext with its last stage and head training (LayerNorm, no BatchNorm): 2 ranks x batch 4 under
    DeepSpeed ZeRO-2 (gloo, CPU) end with the weights of one process with batch 8 on the same global batches (atol
    1e-5, the all-reduce order), the frozen stages untouched, and the optimizer state partitioned one file per rank."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'fastft[deepspeed]')")
    from conftest import run_torchrun, tiny_config
    from safetensors.torch import load_file

    from fastft.train import finetune

    common = {"model__source": "timm", "model__name": "test_convnext", "model__freeze": "until:stages.2"}
    settings = {"optim__epochs": 1, "optim__lr": 0.05, "optim__momentum": 0.9, "log__tensorboard": False}
    one = finetune(tiny_config(shapes4, tmp_path, run__name="one", data__batch_size=8, **common, **settings))
    args = [f"--{k.replace('__', '.')}={str(v).lower()}" for k, v in {**common, **settings}.items()]
    p = run_torchrun(
        2,
        "train",
        f"--data.root={shapes4}",
        "--model.weights=none",
        "--data.image_size=32",
        "--data.workers=0",
        "--data.batch_size=4",
        "--precision.dtype=fp32",
        "--compile.target=none",
        "--log.progress=false",
        "--run.device=cpu",
        "--parallel.backend=deepspeed",
        "--parallel.zero_stage=2",
        f"--run.out_dir={tmp_path}",
        "--run.name=two",
        *args,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    two = tmp_path / "two"
    start = json.loads((two / "events.jsonl").read_text().splitlines()[0])
    assert (start["world_size"], start["total_steps"]) == (2, 6)  # 48 images / global batch 8
    ref, got = load_file(one.paths["model_export"]), load_file(two / "model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0, msg=k)
    shards = list((two / "deepspeed" / "last-step6").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2


def test_a_cached_timm_head_sweep_keeps_a_head_equal_to_a_plain_run(shapes4, tmp_path) -> None:
    """head.sweep_lr on a timm linear probe (resnet10t, its classifier from get_classifier, features from the cache):
    two heads side by side; the kept one, the best by f1_macro, has the weights and the report of a plain run at its
    LR with the same seed, and it is the exported head."""
    from conftest import tiny_config
    from safetensors.torch import load_file

    from fastft.train import finetune

    lrs = [0.02, 0.3]
    common = dict(model__source="timm", model__name="resnet10t", model__freeze="backbone", optim__epochs=2)
    common |= dict(features__cache="memory", features__dtype="fp32", log__tensorboard=False)
    sweep = finetune(tiny_config(shapes4, tmp_path, run__name="sweep", head__sweep_lr=lrs, **common))
    rows = sweep.metrics["sweep"]
    assert [r["lr"] for r in rows] == lrs and rows[0]["loss"] != rows[1]["loss"]
    best = sweep.metrics["sweep_best"]
    assert best == max(range(len(lrs)), key=lambda i: rows[i]["f1_macro"])
    bank = torch.load(sweep.paths["last"], weights_only=True)["sweep_bank"]
    alone = finetune(tiny_config(shapes4, tmp_path, run__name="alone", optim__lr=lrs[best], **common))
    head = load_file(alone.paths["head_export"])
    for k, v in head.items():
        torch.testing.assert_close(bank[f"heads.{best}.{k}"], v, atol=1e-5, rtol=1e-4)
    assert sweep.metrics["confusion_matrix"] == alone.metrics["confusion_matrix"]
    assert sweep.metrics["loss"] == pytest.approx(alone.metrics["loss"], abs=1e-5)
    assert torch.equal(load_file(sweep.paths["head_export"])["weight"], bank[f"heads.{best}.weight"])


def test_gradual_unfreezing_of_a_timm_stage(shapes4, tmp_path, monkeypatch) -> None:
    """A timm probe (resnet10t) unfreezing layer4 at epoch 2, in train mode as the loop runs it: after epoch 1 only
    the classifier has moved; after epoch 2 every layer4 weight and BatchNorm statistic has too, and layer3 and the
    stem never change."""
    from conftest import tiny_config

    import fastft.trainer as trainer
    from fastft.train import finetune

    snapshots = []
    real_end = trainer.end_of_epoch

    def spy_end(run, epoch, *args, **kwargs):
        snapshots.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
        return real_end(run, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "end_of_epoch", spy_end)
    initial = {}
    real_build = trainer.build_backbone

    def build(*args, **kwargs):  # the run's own initial weights
        backbone = real_build(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in backbone.model.state_dict().items()})
        return backbone

    monkeypatch.setattr(trainer, "build_backbone", build)
    cfg = tiny_config(
        shapes4,
        tmp_path,
        model__source="timm",
        model__name="resnet10t",
        model__freeze="backbone",
        optim__epochs=2,
        optim__unfreeze=["2:layer4:0.5"],
        log__tensorboard=False,
    )
    result = finetune(cfg)
    assert len(snapshots) == 2
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["module"] for e in events if e["event"] == "unfreeze"] == ["layer4"]

    def moved(state) -> set[str]:
        return {k for k, v in initial.items() if k in state and not torch.equal(state[k], v)}

    counted = {k for k in initial if k.endswith("num_batches_tracked")}
    assert moved(snapshots[0]) - counted == {"fc.weight", "fc.bias"}
    after = moved(snapshots[1]) - counted
    assert {k.split(".")[0] for k in after} == {"layer4", "fc"}  # the stem and layers 1-3 stay as built
    # every layer4 convolution trained, and its BatchNorm statistics moved: the stage ran in train mode (a BN weight
    # may stay put: timm zero-initialises each block's last BN scale, so the first updates of its branch are zero)
    trained = {k for k in initial if k.startswith("layer4.") and k.endswith(("conv1.weight", "conv2.weight"))}
    stats = {k for k in initial if k.startswith("layer4.") and k.endswith(("running_mean", "running_var"))}
    assert trained and stats and trained | stats <= after


def test_a_timm_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_weights(shapes4, tmp_path, monkeypatch) -> None:
    """resnet10t with layer4 (trainable BatchNorm) and the head training, augmentation on: stopped at step 5 with
    last.pt saved at step 4 (mid-epoch), resumed with checkpoint.resume=auto, it ends with the uninterrupted run's
    weights (fp32 rounding: atol 1e-6) and report."""
    from conftest import run_interrupted, tiny_config
    from safetensors.torch import load_file

    from fastft.train import finetune

    common = dict(model__source="timm", model__name="resnet10t", model__freeze="until:layer3", optim__epochs=2)
    common |= dict(data__augment=True, checkpoint__every_steps=2, optim__warmup_steps=2, log__tensorboard=False)
    full = finetune(tiny_config(shapes4, tmp_path, run__name="full", **common))
    run_interrupted(tiny_config(shapes4, tmp_path, run__name="cut", **common), monkeypatch, at_step=5)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (4, 0, 4)
    resumed = finetune(tiny_config(shapes4, tmp_path, run__name="cut", checkpoint__resume="auto", **common))
    assert resumed.steps == full.steps == 12
    wf, wr = load_file(full.paths["model_export"]), load_file(resumed.paths["model_export"])
    assert not torch.equal(wr["layer4.0.bn1.running_mean"], saved["model"]["layer4.0.bn1.running_mean"])
    for k in wf:
        torch.testing.assert_close(wr[k], wf[k], atol=1e-6, rtol=1e-5, msg=k)
    assert resumed.metrics["confusion_matrix"] == full.metrics["confusion_matrix"]
