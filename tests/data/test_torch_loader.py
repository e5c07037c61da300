"""The torchvision loader's per-sample seeding: a function of (seed, epoch, index) that touches no other RNG."""

from __future__ import annotations

import gc
import os

import numpy as np
import torch
from PIL import Image

from fastft.data.torch_loader import TorchLoader
from fastft.data.transforms import TransformSpec


def _images(folder, n: int, size: tuple[int, int], ext: str) -> list[tuple[str, int]]:
    """n random images of `size` (height, width); sample i is labelled i."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        path = folder / f"{i}.{ext}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), i))
    return samples


def test_loading_in_process_leaves_the_cuda_generators_alone(tmp_path, monkeypatch) -> None:
    """With data.workers=0 the samples are augmented in the training process. Seeding each sample must not reseed the
    CUDA generators (torch.manual_seed does, and fork_rng(devices=[]) does not restore them): the model's dropout
    would then be a function of the last sample loaded. Observed through the calls that reseed CUDA; the CPU
    generator must come back as it was, and the augmentation must still follow the sample's seed."""
    samples = _images(tmp_path, 8, (40, 48), "jpg")
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append("manual_seed_all"))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append("manual_seed"))
    spec = TransformSpec(crop_size=16, resize_size=20)

    def epoch(seed: int) -> dict[int, torch.Tensor]:
        loader = TorchLoader(samples, spec, train=True, batch_size=4, workers=0, seed=seed)
        return {int(y): x for xs, ys in loader for x, y in zip(xs, ys)}

    cpu_state = torch.get_rng_state()
    first, again, other = epoch(1), epoch(1), epoch(2)
    assert calls == []
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert all(torch.equal(first[i], again[i]) for i in range(8))  # seeded per sample
    assert sum(not torch.equal(first[i], other[i]) for i in range(8)) >= 6  # another seed draws other crops


class _Native:
    """Stands for a native object (a DALI pipeline) whose destructor must run in the process that made it: it
    writes the pid of the process that finalises it to a file every process can see."""

    def __init__(self, log) -> None:
        self.log = log
        self.cycle = self  # reachable only by the garbage collector once dropped

    def __del__(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_forked_workers_never_finalise_the_garbage_they_inherit(tmp_path, monkeypatch) -> None:
    """A forked worker whose garbage collector finalised an inherited DALI pipeline hung forever (its executor waits
    for threads that only exist in the parent). Here each worker runs a full collection before every sample: the
    inherited cycle must not be finalised there, and this process must still collect it."""
    from fastft.data import torch_loader

    real_getitem = torch_loader.ImageDataset.__getitem__

    def getitem(self, key):
        gc.collect()  # in the worker: the inherited garbage is in reach of this collector unless frozen
        return real_getitem(self, key)

    monkeypatch.setattr(torch_loader.ImageDataset, "__getitem__", getitem)
    samples = _images(tmp_path, 4, (20, 20), "png")
    loader = TorchLoader(samples, TransformSpec(crop_size=8, resize_size=8), train=True, batch_size=2, workers=2)
    log = tmp_path / "finalised.txt"
    gc.disable()  # the cycle must not be collected before the loader starts by chance
    try:
        _Native(log)
        batches = list(loader)
    finally:
        gc.enable()
        loader.close()
    assert not log.exists() or log.read_text().split() == [str(os.getpid())]  # no worker finalised it
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())]  # finalised once, here
    assert sorted(int(y) for _, ys in batches for y in ys) == [0, 1, 2, 3]
