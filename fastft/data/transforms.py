"""The image preprocessing contract shared by every loader: the chosen weights' preset (resize, crop, mean/std)."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def torchvision_transform(spec: TransformSpec, *, train: bool):
    """RandomResizedCrop + flip for training; resize shorter side + centre crop for evaluation."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    interp = InterpolationMode(spec.interpolation)
    head = (
        [T.RandomResizedCrop(spec.crop_size, interpolation=interp, antialias=True), T.RandomHorizontalFlip()]
        if train
        else [T.Resize(spec.resize_size, interpolation=interp, antialias=True), T.CenterCrop(spec.crop_size)]
    )
    return T.Compose([T.ToImage(), *head, T.ToDtype(torch.float32, scale=True), T.Normalize(spec.mean, spec.std)])
