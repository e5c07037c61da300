"""An exponential moving average of the trainable weights (`optim.ema_decay`, every `optim.ema_every` steps).

torch.optim.swa_utils.AveragedModel + get_ema_multi_avg_fn do the averaging; this module says what is averaged,
where it is saved and which weights a checkpoint gives.

- What: a copy of the trainable suffix (the frozen prefix never changes, so it is not copied). Under DDP the suffix is
  the unwrapped module, whose parameters are the same on every rank.
- Buffers (BatchNorm running statistics) are averaged with the same decay (use_buffers=True), as torchvision's and
  timm's EMA do: statistics copied from the raw model would describe the raw weights' activations, not the averaged
  weights'. Each rank averages its own statistics; rank 0's are given to every rank before an evaluation or save,
  as the raw model's are (fastft.parallel.backend.sync_buffers).
- Saved: the averaged tensors under the model's state-dict keys (the trainable ones only: a probe checkpoint's EMA
  is as small as its model entry) and n_averaged, so a resume continues the average bit for bit.
- Which weights a checkpoint gives (eval, predict, export): the EMA's when the run's checkpoint.best_metric is an
  `ema/` key, else the raw ones; the export's metadata says which (`ema_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fastft.errors import CheckpointError, ConfigError

log = logging.getLogger("fastft")

PREFIX = "ema/"  # report keys of the EMA model's evaluation: ema/top1, ema/f1_macro, ...


class Ema:
    """The EMA of `suffix` (the trainable part of `model`, sharing its tensors)."""

    def __init__(self, suffix: nn.Module, model: nn.Module, *, decay: float, every: int) -> None:
        from fastft.checkpoint import trainable_keys

        self.suffix, self.every = suffix, every
        self.averaged = AveragedModel(suffix, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        # suffix tensor -> model key, by identity (the split's modules are the model's own). Tensors the split copied
        # into the suffix (frozen constants) have no key: they never change.
        names = {id(t): k for k, t in _tensors(model)}
        keys = trainable_keys(model)
        self.keys = {
            n: names[id(t)] for n, t in _tensors(suffix) if id(t) in names and names[id(t)] in keys
        }  # suffix name -> model key, trainable only
        missing = sorted(k for k, p in model.named_parameters() if p.requires_grad and k not in self.keys.values())
        if missing:  # a trainable tensor outside the suffix would be exported raw under an "EMA" label
            raise ConfigError(f"optim.ema_decay: the trainable parameters {missing[:3]} are not in the trainable part")

    @property
    def module(self) -> nn.Module:
        """The averaged suffix (a module of the same structure as the trainable suffix)."""
        return self.averaged.module

    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based): average when it is due."""
        if step % self.every == 0:
            self.averaged.update_parameters(self.suffix)

    def sync(self) -> None:
        """Rank 0's averaged buffers on every rank (a collective under DDP; see the module docstring)."""
        from fastft.parallel.backend import sync_buffers

        sync_buffers(self.module)

    def paired(self, suffix: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        """For one evaluation pass over both models: features -> (2, B, classes) logits, `suffix`'s then the EMA's
        (run_evaluation's `heads=2`). Syncs the averaged buffers first (a collective under DDP)."""
        self.sync()
        self.module.eval()
        return lambda feats: torch.stack([suffix(feats), self.module(feats)])

    @staticmethod
    def merge(raw: dict, ema: dict) -> dict:
        """The raw model's report, with the EMA model's scalars under `ema/` keys."""
        # and the EMA model's tuned per-label thresholds (eval.tune_thresholds), saved with it when it is kept
        kept = {k: v for k, v in ema.items() if isinstance(v, float) or k == "tuned/thresholds"}
        return {**raw, **{f"{PREFIX}{k}": v for k, v in kept.items()}}

    def state_dict(self) -> dict:
        """The averaged trainable tensors by model key, and the number of averages taken."""
        own = dict(_tensors(self.module))
        return {
            "state": {key: own[n].detach().clone() for n, key in self.keys.items()},
            "n_averaged": self.averaged.n_averaged.detach().clone(),
        }

    def load_state_dict(self, saved: dict | None, path: Path | str) -> None:
        """Continue from a checkpoint's EMA (the model already restored). Every tensor starts as the model's (the
        frozen ones, never stored, stay equal to it); the saved trainable ones replace theirs. None: a checkpoint
        without an EMA, which starts over from here."""
        with torch.no_grad():
            for (_, e), (_, m) in zip(_tensors(self.module), _tensors(self.suffix), strict=True):
                e.copy_(m)
            if saved is None:
                log.warning("fastft: %s holds no EMA of the weights; the average starts over from here", path)
                self.averaged.n_averaged.zero_()
                return
            own = dict(_tensors(self.module))
            missing = sorted(set(self.keys.values()) - set(saved["state"]))
            if missing:
                raise CheckpointError(f"{path}: its EMA state lacks {missing[:3]} of this run's trainable part")
            for n, key in self.keys.items():
                own[n].copy_(saved["state"][key])
            self.averaged.n_averaged.copy_(saved["n_averaged"])

    def model_state(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's state dict `raw` with the averaged tensors in place of the trainable ones."""
        own = dict(_tensors(self.module))
        return {**raw, **{key: own[n].detach().to(raw[key].dtype) for n, key in self.keys.items()}}


def build_ema(cfg, suffix: nn.Module, model: nn.Module) -> Ema | None:
    """The run's EMA from its optim config (None when `ema_decay` is 0)."""
    if not cfg.ema_decay:
        return None
    return Ema(suffix, model, decay=cfg.ema_decay, every=cfg.ema_every)


def picks_ema(best_metric: str) -> bool:
    """Does a run with this checkpoint.best_metric keep (and export) its EMA weights?"""
    return best_metric.startswith(PREFIX)


def apply_saved(model: nn.Module, ckpt: dict, path: Path | str) -> bool:
    """Load a checkpoint's EMA weights into `model` (already loaded with its raw weights) when the checkpoint's best
    metric picks the EMA. Returns whether it did."""
    saved = ckpt.get("ema")
    if saved is None or not picks_ema(ckpt.get("best", {}).get("metric", "")):
        return False
    own = model.state_dict()
    unknown = sorted(set(saved["state"]) - set(own))
    if unknown:
        raise CheckpointError(f"{path}: its EMA state holds keys the model lacks: {unknown[:3]}")
    model.load_state_dict(saved["state"], strict=False)
    return True


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, in AveragedModel's order (the order update_parameters pairs them in)."""
    return [*module.named_parameters(), *module.named_buffers()]
