"""MixUp / CutMix of a training batch (`augment.mixup_alpha`, `augment.cutmix_alpha`, `augment.mix_prob`).

torchvision.transforms.v2's MixUp and CutMix do the mixing; they draw from the global CPU generator, which is forked
and seeded here from (run seed, epoch, batch index in the epoch), so a batch's lambda, box and choice are the same
after a resume and on every rank. Pairs are torchvision's: each sample with its neighbour in the (per-rank) batch.
Applied on the device after the loader; the targets come back as soft labels (B, K) for the soft cross-entropy of
fastft/losses.py. Per-sample pixel augmentation is in fastft/data/transforms.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.config import AugmentConfig


def mix_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one batch's mixing draws: a function of (run seed, epoch, batch index in the epoch) only."""
    return ((seed * 1_000_033 + epoch) * 998_244_353 + batch) % 2**63


class BatchMix:
    """Mix a batch: (images B3HW, labels B) -> (mixed images, soft targets B x K, each row summing to 1)."""

    def __init__(self, cfg: AugmentConfig, *, num_classes: int, seed: int) -> None:
        from torchvision.transforms import v2 as T

        mixes = []
        if cfg.mixup_alpha > 0:
            mixes.append(T.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
        if cfg.cutmix_alpha > 0:
            mixes.append(T.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
        if not mixes:
            raise ValueError("BatchMix needs augment.mixup_alpha or augment.cutmix_alpha > 0")
        self.mix = mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)  # equal odds, as torchvision's references
        self.prob, self.num_classes, self.seed = cfg.mix_prob, num_classes, seed

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        channels_last = images.ndim == 4 and images.is_contiguous(memory_format=torch.channels_last)
        with torch.random.fork_rng(devices=[]):  # the model's random streams are left as they were
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, batch))
            if float(torch.rand(())) < self.prob:
                images, targets = self.mix(images, labels)
            else:
                targets = F.one_hot(labels, self.num_classes).float()
        if channels_last:  # torchvision's roll/mul return the default layout
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets


def batch_mix(cfg: AugmentConfig, *, num_classes: int, seed: int) -> BatchMix | None:
    """The run's batch mixing, or None when MixUp and CutMix are both off."""
    if not cfg.mix_options():
        return None
    return BatchMix(cfg, num_classes=num_classes, seed=seed)
