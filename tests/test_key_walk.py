"""Every documented key (each dataclass field of fastft/config.py), set to a representative non-default value in a tiny
run, ends in success or in one `fastft: error:` line, never a traceback.

Most keys run in-process through fastft.finetune (resnet18 at 32 px, 2 classes x 4 train + 2 val images, one or two
steps), a FastftError being the one-line outcome; a few go through the CLI. Keys that need an environment these tests
do not have are listed in SKIPPED with the reason. A field added to the config without an entry here fails
test_every_key_has_a_value_or_a_reason.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
sys.path.insert(0, str(Path(__file__).parent / "text"))
from _reliability import FAST, cli, one_thread
from tiny_bert import make_tiny_bert

from fastft.errors import FastftError
from fastft.resume import config_keys

# A text run (model.source=hf): the tiny BERT of tests/text/tiny_bert.py and CSVs of text,label rows.
TEXT = {
    "model.source": "hf",
    "model.name": "@bert",
    "data.root": "",
    "data.train_list": "@text/train.csv",
    "data.val_list": "@text/val.csv",
}

# key -> the value it is set to, plus companion settings ("@data" / "@lists" / "@tmp" / "@weights" are filled in
# from fixtures) that give the value something to act on.
VALUES: dict[str, tuple[object, dict[str, object]]] = {
    "model.source": ("timm", {"model.name": "resnet10t"}),
    "model.name": ("mobilenet_v3_small", {}),
    "model.weights": ("@weights", {}),
    "model.num_classes": (2, {}),
    "model.freeze": ("until:layer4", {}),
    "model.head_hidden": (8, {}),
    "model.head_dropout": (0.5, {}),
    "model.channels_last": (False, {}),
    "model.fold_bn": (False, {}),
    "model.grad_checkpointing": (True, {"model.source": "timm", "model.name": "resnet10t", "model.freeze": "none"}),
    "model.activation_checkpointing": (True, {"model.freeze": "until:layer3"}),
    "model.drop_path": (0.1, {}),  # resnet18 has no stochastic depth: one line saying so
    "head.sweep_lr": ([0.1, 0.01], {}),
    "head.sweep_weight_decay": ([0.0, 0.1], {"head.sweep_lr": [0.1, 0.01]}),
    "data.root": ("@data", {}),
    "data.train_dir": ("training", {}),  # absent: root's folders (train, val) are then taken as class folders
    "data.val_dir": ("validation", {}),
    "data.val_fraction": (0.5, {"data.root": "@data/train"}),  # class folders only: split by val_fraction
    "data.train_list": ("@lists/train.csv", {"data.root": "", "data.val_list": "@lists/val.csv"}),
    "data.val_list": ("@lists/val.csv", {"data.root": "", "data.train_list": "@lists/train.csv"}),
    "data.image_size": (48, {}),
    "data.max_length": (16, TEXT),  # a tiny BERT takes 64 positions: the default 128 is refused
    "data.batch_size": (2, {}),
    "data.eval_batch_size": (3, {}),
    "data.workers": (1, {}),
    "data.loader": ("synthetic", {}),
    "data.augment": (False, {}),
    "data.pin_memory": (False, {}),
    "data.persistent_workers": (False, {"data.workers": 1}),
    "data.on_bad_file": ("skip", {}),
    "data.sampler": ("balanced", {}),
    "data.task": ("multilabel", {}),  # with data.root: one line (label sets come from data.train_list)
    "eval.threshold": (0.3, {}),
    "eval.tune_thresholds": (True, {}),  # on a single-label run: one line
    "augment.policy": ("autoaugment", {}),
    "augment.random_erase": (0.5, {}),
    "augment.color_jitter": (0.4, {}),
    "augment.mixup_alpha": (0.2, {}),
    "augment.cutmix_alpha": (1.0, {"augment.mixup_alpha": 0.2}),
    "augment.mix_prob": (0.5, {"augment.cutmix_alpha": 1.0}),
    "optim.name": ("adamw", {}),
    "optim.lr": (0.1, {}),
    "optim.momentum": (0.5, {}),
    "optim.weight_decay": (0.01, {}),
    "optim.betas": ([0.8, 0.99], {"optim.name": "adamw"}),
    "optim.schedule": ("constant", {}),
    "optim.warmup_steps": (1, {}),
    "optim.min_lr_ratio": (0.1, {}),
    "optim.label_smoothing": (0.1, {}),
    "optim.loss": ("focal", {}),
    "optim.focal_gamma": (1.0, {"optim.loss": "focal"}),
    "optim.class_weights": ("balanced", {}),
    "optim.grad_accum": (2, {}),
    "optim.clip_grad_norm": (1.0, {}),
    "optim.epochs": (2, {}),
    "optim.max_steps": (1, {}),
    "optim.layer_decay": (0.5, {"model.freeze": "until:layer4"}),
    "optim.unfreeze": (["2:layer4"], {"optim.epochs": 2}),
    "optim.ema_decay": (0.9, {}),
    "optim.ema_every": (2, {"optim.ema_decay": 0.9}),
    "precision.dtype": ("bf16", {}),
    # the eager backend: torch.compile traces the head (Dynamo) without the C toolchain inductor needs on CPU
    "compile.target": ("head", {"compile.backend": "eager"}),
    "compile.mode": ("reduce-overhead", {"compile.target": "head", "compile.backend": "eager"}),
    "compile.backend": ("eager", {"compile.target": "head"}),
    "parallel.backend": ("ddp", {}),  # one process: runs without DDP, says so
    "parallel.timeout_s": (30, {}),
    "parallel.sync_bn": ("on", {}),  # one process: nothing to synchronise
    "parallel.zero_stage": (1, {}),  # only DeepSpeed reads it
    "features.cache": ("memory", {}),
    "features.views": (2, {"features.cache": "memory"}),
    "features.dtype": ("fp32", {"features.cache": "memory"}),
    "features.dir": ("@tmp/cache", {"features.cache": "disk"}),
    "checkpoint.every_epochs": (0, {}),
    "checkpoint.every_steps": (1, {}),
    "checkpoint.best_metric": ("top1", {}),
    "checkpoint.best_mode": ("min", {}),
    "checkpoint.resume": ("auto", {}),
    "checkpoint.patience": (1, {"optim.epochs": 3}),
    "checkpoint.min_delta": (0.5, {"checkpoint.patience": 1, "optim.epochs": 3}),
    "log.tensorboard": (True, {}),  # the base run sets false (cost); the default is walked here
    "log.progress": (True, {}),
    "log.every_steps": (1, {}),
    "log.step_timing": (True, {}),
    "run.out_dir": ("@tmp/other", {}),
    "run.name": ("named", {}),
    "run.seed": (7, {}),
    "run.deterministic": (True, {}),
    "run.device": ("auto", {}),
    "run.overwrite": (True, {}),
    "run.eval_every_epochs": (2, {"optim.epochs": 2}),
}

# Keys not walked, and values of walked keys that are not, each with the environment it needs and where it is tested.
SKIPPED = {
    "parallel.deepspeed_config": "read only by the DeepSpeed backend (tests/parallel/test_deepspeed.py)",
}
VALUES_NOT_WALKED = {
    "parallel.backend = deepspeed": "the DeepSpeed launcher and backend (tests/parallel/test_deepspeed.py)",
    "data.loader = dali": "NVIDIA DALI (tests/data/test_dali_loader.py, tests/data/test_dali_integration.py)",
    "run.device = cuda": "a GPU (tests/test_gpu.py); without one it is a one-line error (tests/test_cli.py)",
}

BASE = {
    "model.name": "resnet18",
    "model.weights": "none",
    "model.freeze": "backbone",
    "data.image_size": 32,
    "data.batch_size": 4,
    "data.workers": 0,
    "precision.dtype": "fp32",
    "compile.target": "none",
    "optim.epochs": 1,
    "log.progress": False,
    "log.tensorboard": False,
    "run.device": "cpu",
    "run.name": "walk",
}


def test_every_key_has_a_value_or_a_reason() -> None:
    keys = config_keys()
    missing = [k for k in keys if k not in VALUES and k not in SKIPPED]
    assert missing == [], "give each new config key a representative value in VALUES (or a reason in SKIPPED)"
    assert sorted(set(VALUES) | set(SKIPPED)) == sorted(keys)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    import torch
    import torchvision

    from fastft.data.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("walk")
    data = make_image_folder(root / "data", num_classes=2, train_per_class=4, val_per_class=2, image_size=32, seed=3)
    lists = root / "lists"
    lists.mkdir()
    for split in ("train", "val"):
        with open(lists / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            for p in sorted((data / split).rglob("*.jpg")):
                w.writerow([str(p), p.parent.name])
    weights = root / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    text = root / "text"
    text.mkdir()
    for split, n in (("train", 8), ("val", 4)):
        rows = [f"the {'cat' if i % 2 else 'red'} is {'good' if i % 3 else 'bad'},{'ab'[i % 2]}" for i in range(n)]
        (text / f"{split}.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    bert = make_tiny_bert(root / "bert")
    return {"data": data, "lists": lists, "weights": weights, "root": root, "text": text, "bert": bert}


def _fill(value, tiny: dict[str, Path], tmp: Path):
    if isinstance(value, str) and value.startswith("@"):
        name, _, rest = value[1:].partition("/")
        base = tmp if name == "tmp" else tiny[name]
        return str(base / rest) if rest else str(base)
    return value


def _config(key: str, tiny: dict[str, Path], tmp: Path):
    from fastft.config import FinetuneConfig

    value, companions = VALUES[key]
    settings = {**BASE, "data.root": str(tiny["data"]), "run.out_dir": str(tmp / "runs"), **companions, key: value}
    cfg = FinetuneConfig()
    for dotted, v in settings.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, _fill(v, tiny, tmp))
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(VALUES))
def test_each_key_ends_in_success_or_one_line(key, tiny, tmp_path, monkeypatch) -> None:
    from fastft.train import finetune

    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "fastft_cache"))  # the token cache of the text run
    cfg = _config(key, tiny, tmp_path)
    section, name = key.split(".")
    default = getattr(type(getattr(cfg, section))(), name)
    # Non-default, or (for the keys the base run already sets to a non-default value, such as log.progress=false)
    # different from the base run, which then covers the non-default value itself.
    assert VALUES[key][0] != BASE.get(key, default), f"{key}: the walk must change the setting"
    assert key in BASE or VALUES[key][0] != default, f"{key}: the walk must set a non-default value"
    try:
        with one_thread():
            result = finetune(cfg.validate())
    except FastftError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), f"{key}: a multi-line error: {e}"
        print(f"walk {key}: fastft: error: {e}")  # shown with -s: which keys end in a refusal
        return
    assert result.steps >= 1 and (result.run_dir / "model.safetensors").is_file()
    report = json.loads((result.run_dir / "metrics.json").read_text())
    assert report["num_samples"] > 0 and len(report["confusion_matrix"]) == len(report["classes"])


@pytest.mark.parametrize(
    "override",
    ["--optim.unfreeze=['2:layer4']", "--checkpoint.best_metric=auroc", "--data.loader=synthetic"],
)
def test_a_few_keys_through_the_cli(override, tiny, tmp_path) -> None:
    rc, err = cli(
        "train",
        f"--data.root={tiny['data']}",
        *FAST,
        "--data.workers=0",
        "--data.batch_size=4",
        "--optim.epochs=2",
        f"--run.out_dir={tmp_path}",
        override,
    )
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("fastft: error")]
    assert (rc == 0 and errors == []) or (rc == 2 and len(errors) == 1), err[-3000:]
