"""The training loss: cross-entropy or focal, optionally weighted per class (`optim.loss`, `optim.class_weights`).

Every form is a mean over the batch of per-sample terms, `w[y] * l(x, y)` divided by the batch size (not by the sum
of the weights, as `F.cross_entropy(weight=...)` does): the mean of the ranks' (or micro-batches') means is then the
mean over the global batch, so N ranks x batch B still compute the update of one process x N*B. With `balanced`
weights, whose mean over the training set is 1, the loss keeps the scale of the unweighted one.
Labels are class indices (B,) or, with MixUp / CutMix, soft targets (B, K): then sum_c t_c w_c l(x, c).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastft.errors import ConfigError


def class_weights(spec: str | list[float], labels: Sequence[int], classes: Sequence[str]) -> torch.Tensor | None:
    """`optim.class_weights` as a (K,) float32 tensor, or None for "none".

    "balanced" is scikit-learn's `compute_class_weight("balanced")`: n_samples / (n_classes * count[c])."""
    k = len(classes)
    if spec == "none":
        return None
    if spec == "balanced":
        counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=k)
        empty = [classes[i] for i in range(k) if counts[i] == 0]
        if empty:
            raise ConfigError(f"optim.class_weights = balanced: class {empty[0]!r} has no training samples")
        return (len(labels) / (k * counts.double())).float()
    if isinstance(spec, str):
        raise ConfigError(f"optim.class_weights must be none, balanced or a list of {k} weights, got {spec!r}")
    if len(spec) != k:
        raise ConfigError(f"optim.class_weights: {len(spec)} weights for {k} classes ({', '.join(classes)})")
    bad = [w for w in spec if not (w >= 0 and math.isfinite(w))]
    if bad or not any(spec):
        raise ConfigError(f"optim.class_weights: weights must be finite, >= 0 and not all 0, got {spec}")
    return torch.tensor(spec, dtype=torch.float32)


class Loss:
    """Per-sample training loss and its batch mean (see the module docstring)."""

    def __init__(
        self, *, kind: str = "ce", gamma: float = 2.0, label_smoothing: float = 0.0, weights: torch.Tensor | None = None
    ) -> None:
        if kind == "focal" and label_smoothing:
            raise ConfigError("optim.loss = focal does not take optim.label_smoothing (set it to 0)")
        self.kind, self.gamma, self.label_smoothing, self.weights = kind, gamma, label_smoothing, weights

    def to(self, device: torch.device) -> Loss:
        if self.weights is not None:
            self.weights = self.weights.to(device)
        return self

    def per_sample(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample losses for class indices (B,) or soft targets (B, K) (MixUp / CutMix, fastft/augment.py)."""
        logits = logits.float()
        if labels.ndim == 2:
            return self._soft(logits, labels)
        ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
        if self.kind == "focal":  # -(1 - p_y)^gamma log p_y (Lin et al.), p_y the softmax probability of the label
            p = torch.exp(-ce)
            ce = (1 - p).pow(self.gamma) * ce
        if self.weights is not None:
            ce = ce * self.weights[labels]
        return ce

    def _soft(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """sum_c t_c * w_c * l(x, c): the target-weighted mix of the per-class terms, so a one-hot row gives exactly
        the hard-label loss (label smoothing and class weights included) and a mixed row the same mix of the two
        samples' losses."""
        if self.kind == "focal":
            raise ConfigError("optim.loss = focal takes class labels, not mixed targets (MixUp / CutMix): use ce")
        nll = -F.log_softmax(logits, dim=-1)
        if self.label_smoothing:  # F.cross_entropy's smoothing: (1 - eps) * nll_c + eps * mean_k nll_k
            nll = (1 - self.label_smoothing) * nll + self.label_smoothing * nll.mean(dim=-1, keepdim=True)
        t = targets.float() if self.weights is None else targets.float() * self.weights
        return (t * nll).sum(dim=-1)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, labels).mean()


class MultilabelLoss:
    """`data.task = "multilabel"`: torch's BCEWithLogits on multi-hot targets (B, C), a mean over samples and classes.

    `per_sample` is each sample's mean over its classes, so the batch mean (and the mean of the ranks' means) is
    `BCEWithLogitsLoss()`'s mean over the global batch, as for the single-label loss above."""

    def to(self, device: torch.device) -> MultilabelLoss:
        return self

    def per_sample(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
        return bce.mean(dim=-1)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, targets).mean()
