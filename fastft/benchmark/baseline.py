"""The seed baseline: the plain fine-tuning loop of the article this project starts from, kept deliberately naive.

What it does, and what fastft does differently (the reason each fastft mode is reported as a ratio to this):
- the backbone is frozen by `requires_grad=False` only and stays in train mode (`model.train()` for the whole
  model): BatchNorm keeps computing batch statistics and updating its running buffers on every forward;
- fp32 everywhere, contiguous (NCHW) memory format, no torch.compile, no feature cache: every epoch decodes every
  JPEG and runs the whole backbone again;
- a default `DataLoader` over `torchvision.datasets.ImageFolder` with the weights' own transforms (resize + centre
  crop + normalise), `shuffle=True`, `num_workers` as given;
- SGD lr 0.001 momentum 0.9 over the new head, cross-entropy loss.

After the last epoch the model is evaluated once on `DIR/val` (top-1), as fastft does at the end of a run, so both
sides of a comparison deliver a trained and evaluated model. Nothing is written to disk. It lives in the package
because the built-in suites report every mode as a multiple of it; `benchmarks/baseline_seed.py` runs it alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torchvision
from torch import nn, optim
from torchvision import datasets

SETTINGS = {
    "precision": "fp32",
    "memory_format": "contiguous",
    "frozen_by": "requires_grad=False (backbone left in train mode)",
    "optimizer": "SGD lr=0.001 momentum=0.9 (head only)",
    "loss": "cross-entropy",
    "loader": "torch.utils.data.DataLoader(ImageFolder(weights.transforms()), shuffle=True)",
    "compile": False,
    "feature_cache": False,
}


def weights_transform(model_name: str, image_size: int = 0):
    """The weights' preset transform; `image_size` rescales crop and resize as fastft's `data.image_size` does."""
    preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms  # reading it downloads nothing
    if not image_size:
        return preset()
    base = preset()
    crop, resize = base.crop_size[0], base.resize_size[0]
    return preset(crop_size=image_size, resize_size=max(image_size, round(image_size * resize / crop)))


def run_seed(
    root: str | Path,
    *,
    model_name: str = "resnet50",
    epochs: int = 10,
    batch_size: int = 32,
    workers: int = 2,
    image_size: int = 0,
    seed: int = 0,
    device: str = "cpu",
    evaluate: bool = True,
    sync=None,
) -> dict:
    """Train a linear probe the article's way on `root/train` (ImageFolder); evaluate once on `root/val`.

    Returns:
        {"total_s": wall time of the whole call (dataset scan, model build, epochs, evaluation),
         "epochs": [{"seconds", "images", "images_per_s"}], "top1", "images_per_epoch", "settings"}.
    """
    t_start = time.perf_counter()
    sync = sync or (torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None))
    torch.manual_seed(seed)
    root = Path(root)
    transform = weights_transform(model_name, image_size)
    train_set = datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)

    model = torchvision.models.get_model(model_name, weights=None)  # pretrained-shaped; weights change no timing
    for param in model.parameters():
        param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(train_set.classes))  # new head: trainable by default
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.9)

    per_epoch = []
    for _ in range(epochs):
        model.train()
        seen = 0
        sync()
        t0 = time.perf_counter()
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            seen += inputs.shape[0]
        sync()
        seconds = time.perf_counter() - t0
        per_epoch.append({"seconds": seconds, "images": seen, "images_per_s": seen / seconds})

    top1 = None
    if evaluate and (root / "val").is_dir():
        val_set = datasets.ImageFolder(str(root / "val"), transform=transform)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, num_workers=workers)
        model.eval()
        correct = 0
        with torch.no_grad():
            for inputs, labels in val_loader:
                correct += (model(inputs.to(device)).argmax(1).cpu() == labels).sum().item()
        top1 = correct / len(val_set)
    sync()
    return {
        "total_s": time.perf_counter() - t_start,
        "epochs": per_epoch,
        "top1": top1,
        "images_per_epoch": len(train_set),
        "model": model_name,
        "batch_size": batch_size,
        "workers": workers,
        "image_size": transform.crop_size[0],
        "settings": SETTINGS,
    }
