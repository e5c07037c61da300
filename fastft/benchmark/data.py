"""The benchmarks' inputs and stamps: a folder of photo-like JPEGs generated once, the CPU model, package versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

SYNTHETIC_VERSION = 1  # bump when the generator changes, so stale caches are not reused


def synthetic_folder(num_images: int, num_classes: int = 4, seed: int = 0) -> Path:
    """Generates (once) an ImageFolder of photo-like JPEGs, ~256 px with varied aspect, and returns its root.

    Content is smooth random colour fields plus mild noise, so JPEG sizes and decode cost resemble
    photos (pure noise would compress badly and decode unrealistically slowly).
    """
    from PIL import Image

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastft" / "data_bench"
    root = cache / f"synthetic-v{SYNTHETIC_VERSION}-n{num_images}-c{num_classes}-s{seed}"
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        h, w = (int(v) for v in rng.integers(224, 321, size=2))
        coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(field + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / f"class{i % num_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=90)
    done.touch()
    return root


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    try:
        from nvidia import dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    import PIL
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "dali": dali_version,
        "pillow": PIL.__version__,
    }
