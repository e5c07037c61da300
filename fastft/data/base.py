"""The contract every loader implements (torchvision, DALI, synthetic), so the training loop, evaluation and the
feature cache use any of them alike. `build_loader` (loaders.py) is the one place that makes them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

PREFETCH_PER_WORKER = 4  # batches each DataLoader worker keeps ready (DALI's CPU training queue matches it)


@runtime_checkable
class Loader(Protocol):
    """One rank's batches of (images float32 B3HW, targets), the same count on every rank. Targets are int64 (B,)
    class indices, or float32 (B, C) multi-hot rows for a multilabel task.

    Attributes:
        skipped: the files `data.on_bad_file = "skip"` dropped before loading (set by `build_loader`).
    """

    skipped: list[str]

    def __len__(self) -> int:
        """Batches per epoch, from `start_batch` 0."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of the epoch last asked for with `set_epoch` (or `start`)."""
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration yields `epoch` from batch `start_batch` on (an exact mid-epoch resume)."""
        ...

    def start(self, epoch: int, start_batch: int = 0) -> None:
        """`set_epoch`, and begin loading that epoch now, ahead of its iteration (overlaps the caller's set-up)."""
        ...

    def close(self) -> None:
        """End the loader's workers or pipeline now; a later iteration starts new ones."""
        ...
