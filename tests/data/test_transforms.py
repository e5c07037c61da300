"""The training augmentation contract: `train_crop` draws exactly what the torchvision training transform draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from fastft.data.sampler import sample_seed
from fastft.data.transforms import TransformSpec, torchvision_transform, train_crop


# Sizes cover windows that fit at once, sizes where few fit (many redraws), and both centre-crop fallbacks (too
# wide, too tall) after 10 failed draws.
@pytest.mark.parametrize("width,height", [(40, 30), (30, 40), (17, 16), (64, 64), (1, 1), (200, 10), (3, 500)])
def test_train_crop_is_the_torchvision_transforms_draw(width, height) -> None:
    spec = TransformSpec(crop_size=16, resize_size=18)
    transform = torchvision_transform(spec, train=True)
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    flips = set()
    for index in range(40):
        seed = sample_seed(3, index % 4, index)
        torch.manual_seed(seed)  # what the torchvision loader does for this sample
        want = transform(image)
        before = torch.random.get_rng_state()
        top, left, h, w, flip = train_crop(width, height, seed)
        assert torch.equal(torch.random.get_rng_state(), before)  # a private generator: the global RNG is untouched
        assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
        got = F.resized_crop(F.to_image(image), top, left, h, w, [16, 16], antialias=True)
        got = F.horizontal_flip(got) if flip else got
        got = F.normalize(F.to_dtype(got, torch.float32, scale=True), spec.mean, spec.std)
        assert torch.equal(got, want), (index, (top, left, h, w, flip))
        flips.add(flip)
    assert flips == {True, False}
