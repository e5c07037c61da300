"""fastft against a timm-style training loop: full and partial fine-tune img/s, runs alternated in pairs.

timm's pip package ships no train.py, so its side is a faithful equivalent of train.py's `train_one_epoch` built from
timm's own pieces: `timm.create_model`, `timm.data.create_dataset` + `create_loader` (its training transform:
RandomResizedCrop + flip; colour jitter off, as fastft's default), `timm.optim.create_optimizer_v2`,
`timm.scheduler.create_scheduler_v2` stepped per update, autocast (`--amp`) in the precision fastft resolves,
`--channels-last`, and for a partial fine-tune `timm.utils.freeze` (the frozen stages' BatchNorm becomes
FrozenBatchNorm2d). Both sides: the same JPEG folder, model architecture, batch, workers, precision, optimizer (SGD
lr 0.001 momentum 0.9), no torch.compile. A side's figure is its last epoch's img/s (the first is warm-up).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastft.benchmark import cases, measure
from fastft.benchmark.suites import FREEZE, Case, Settings, TimmComparison

# fastft's `until:<stage>` as the timm module names it freezes (resnet: the stem is conv1 + bn1).
_TIMM_FROZEN = {"until:layer3": ["conv1", "bn1", "layer1", "layer2", "layer3"]}


def run_comparison(t: TimmComparison, s: Settings, *, device: torch.device, run_id: str, work: Path) -> dict:
    """`t.pairs` alternated (fastft, timm) pairs per mode; the ratio of each pair and their median."""
    if t.batch_size:
        s = dataclasses.replace(s, batch_size=t.batch_size)
    root = cases.bench_folder(t.train_images, t.val_images)
    prec = measure.precision_name(t.precision, device)
    modes = {}
    for mode in t.modes:
        fastft_ips, timm_ips = [], []
        for i in range(t.pairs):
            order = ("fastft", "timm") if i % 2 == 0 else ("timm", "fastft")  # neither side always runs first
            for side in order:
                if side == "fastft":
                    fastft_ips.append(fastft_img_s(t, s, root, mode=mode, device=device, work=work))
                else:
                    timm_ips.append(timm_img_s(t, s, root, mode=mode, dtype=prec, device=device))
        ratios = [f / b for f, b in zip(fastft_ips, timm_ips, strict=True)]
        modes[mode] = {
            "fastft_images_per_s": fastft_ips,
            "timm_images_per_s": timm_ips,
            "ratios": ratios,
            "ratio_median": statistics.median(ratios),
        }
    return {
        "run_id": run_id,
        **asdict(t),
        "precision": prec,
        "batch_size": s.batch_size,
        "image_size": measure.crop_size(t.model, s.image_size),
        "workers": s.workers,
        "partial_freeze": s.partial_freeze,
        "modes": modes,
    }


def fastft_img_s(t: TimmComparison, s: Settings, root: Path, *, mode: str, device: torch.device, work: Path) -> float:
    case = Case(f"{mode}/timm-compare", t.model, mode, loader="torch", precision=t.precision)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        cfg = cases.case_config(case, s, root, Path(tmp), epochs=t.epochs, device=device)
        cfg.data.augment = True  # the training transform, as timm's loader applies
        cfg.log.step_timing = False  # its per-segment syncs would cost fastft overlap on a GPU
        result, _, _ = measure.finetune_quiet(cfg)
    return result.throughput[f"epoch{t.epochs - 1}"]


def timm_model(name: str, freeze: str, *, num_classes: int) -> torch.nn.Module:
    """timm's model with fastft's `freeze` policy done timm's way (timm.utils.freeze: parameters and BatchNorm)."""
    import timm
    import timm.utils

    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if freeze != "none":
        timm.utils.freeze(model, _TIMM_FROZEN[freeze])
    return model


def timm_img_s(t: TimmComparison, s: Settings, root: Path, *, mode: str, dtype: str, device: torch.device) -> float:
    """train.py's loop over `root/train`, `t.epochs` epochs; the last epoch's images per second."""
    import timm
    import timm.data
    import timm.optim
    import timm.scheduler
    import timm.utils

    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    size = measure.crop_size(t.model, s.image_size)
    dataset = timm.data.create_dataset("", root=str(root / "train"), is_training=True)
    model = timm_model(t.timm_model, FREEZE[mode] or s.partial_freeze, num_classes=len(dataset.reader.class_to_idx))
    model.to(device=device, memory_format=torch.channels_last)
    loader = timm.data.create_loader(
        dataset,
        input_size=(3, size, size),
        batch_size=s.batch_size,
        is_training=True,
        color_jitter=0.0,
        num_workers=s.workers,
        device=device,
        use_prefetcher=cuda,  # its prefetcher needs CUDA
        pin_memory=cuda,
    )
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.001, momentum=0.9, weight_decay=0.0)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, num_epochs=t.epochs, updates_per_epoch=len(loader))
    loss_fn = torch.nn.CrossEntropyLoss().to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else None
    img_s = 0.0
    num_updates = 0
    for epoch in range(t.epochs):
        model.train()
        losses = timm.utils.AverageMeter()
        optimizer.zero_grad()
        seen, t0 = 0, time.perf_counter()
        for x, target in loader:
            if not cuda:
                x, target = x.to(device), target.to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast or torch.autocast(device.type, enabled=False):
                loss = loss_fn(model(x), target)
            loss.backward()
            optimizer.step()
            losses.update(loss.item(), x.size(0))  # train.py, not distributed: every step
            num_updates += 1
            optimizer.zero_grad()
            scheduler.step_update(num_updates=num_updates, metric=losses.avg)
            seen += x.size(0)
        if cuda:
            torch.cuda.synchronize()
        img_s = seen / (time.perf_counter() - t0)
        scheduler.step(epoch + 1)
    return img_s
