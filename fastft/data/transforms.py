"""The image preprocessing contract shared by every loader: the chosen weights' preset (resize, crop, mean/std)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandomResizedCrop's range of crop area (fraction of the image) and aspect ratio, torchvision's defaults.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class TransformSpec:
    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {
            "crop_size": self.crop_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TransformSpec:
        return cls(int(d["crop_size"]), int(d["resize_size"]), tuple(d["mean"]), tuple(d["std"]), d["interpolation"])


def spec_from_weights(weights, image_size: int = 0) -> TransformSpec:
    """Read a torchvision weights enum's preset (None: ImageNet defaults); `image_size` rescales crop and resize."""
    spec = TransformSpec()
    if weights is not None:
        t = weights.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0]) if t.resize_size else crop
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        spec = TransformSpec(crop, resize, tuple(t.mean), tuple(t.std), interp)
    if image_size:
        resize = max(image_size, round(image_size * spec.resize_size / spec.crop_size))
        spec = TransformSpec(image_size, resize, spec.mean, spec.std, spec.interpolation)
    return spec


def torchvision_transform(spec: TransformSpec, *, train: bool, augment=None):
    """RandomResizedCrop + flip for training; resize shorter side + centre crop for evaluation.

    `augment` (an AugmentConfig, training only) adds torchvision's policy and colour jitter after the flip and random
    erasing after normalisation, the order of torchvision's classification references. Every draw is from the global
    CPU generator, which the dataset seeds per sample (torch_loader.ImageDataset)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    interp = InterpolationMode(spec.interpolation)
    head = (
        [
            T.RandomResizedCrop(
                spec.crop_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=interp, antialias=True
            ),
            T.RandomHorizontalFlip(),
            *_pixel_augment(augment, interp),
        ]
        if train
        else [T.Resize(spec.resize_size, interpolation=interp, antialias=True), T.CenterCrop(spec.crop_size)]
    )
    tail = [T.RandomErasing(p=augment.random_erase)] if train and augment is not None and augment.random_erase else []
    return T.Compose(
        [T.ToImage(), *head, T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std), *tail]
    )


def _pixel_augment(augment, interp) -> list:
    """The policy (on uint8 pixels, as torchvision's references apply it) and colour jitter of `augment`."""
    from torchvision.transforms import v2 as T

    if augment is None:
        return []
    policies = {
        "randaugment": lambda: T.RandAugment(interpolation=interp),
        "trivialaugment": lambda: T.TrivialAugmentWide(interpolation=interp),
        "autoaugment": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=interp),
    }
    out = [policies[augment.policy]()] if augment.policy != "none" else []
    if augment.color_jitter:
        s = augment.color_jitter
        out.append(T.ColorJitter(brightness=s, contrast=s, saturation=s))
    return out


@functools.cache
def _log_crop_ratio():
    import torch

    return torch.log(torch.tensor(CROP_RATIO))  # float32, as torchvision computes it


def train_crop(width: int, height: int, seed: int) -> tuple[int, int, int, int, bool]:
    """The crop window (top, left, height, width) and the horizontal flip that the torchvision training transform
    draws for a `width` x `height` image after ``torch.manual_seed(seed)``: the same draws in the same order
    (RandomResizedCrop, then RandomHorizontalFlip), from a private generator, so any thread can compute them without
    touching the global RNG. DALI's training pipeline crops where this says, so both loaders train on the same
    windows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    area = height * width
    log_ratio = _log_crop_ratio()
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(CROP_SCALE[0], CROP_SCALE[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            break
    else:  # no window fits in 10 draws: the centre crop, clamped to the ratio range
        in_ratio = width / height
        if in_ratio < min(CROP_RATIO):
            w, h = width, round(width / min(CROP_RATIO))
        elif in_ratio > max(CROP_RATIO):
            w, h = round(height * max(CROP_RATIO)), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1, generator=g).item() < 0.5)
    return top, left, h, w, flip
