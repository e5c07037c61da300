"""What feeds the trainable part of a text model (`model.source = "hf"`): tokenised rows through the frozen prefix.

The text counterpart of fastft/inputs.py, with the interface the trainer uses. Rows are read and split by
fastft/data/text.py, tokenised once into the token cache (fastft/data/text_tokens.py: `$FASTFT_CACHE/text`, default
~/.cache/fastft/text) and batched by length, sharded by rank (fastft/data/text_loader.py). A batch is a dict of token
tensors: it is moved to the device tensor by tensor (never channels_last) and never padded to a fixed batch size.

The frozen-feature cache (features.cache = memory | disk) stores a linear probe's pooled encoder output
(fastft/text_features.py) and trains from it with the token loader's own batches; a cut inside the encoder is refused.
A head sweep (head.sweep_*, fastft/sweep.py) trains its bank of classifiers on the same pooled output. What the
compiled trainable part (and prefix) takes has its batch and token dimensions marked dynamic (_dynamic).
Not on the text path (each a one-line ConfigError before the run folder is touched): augmented feature views
(features.views), the DALI and synthetic image loaders (data.loader).
model.channels_last is ignored: it concerns image activations only."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch

from fastft.backbones.base import TextSpec
from fastft.backbones.hf_text import INPUT_KEYS
from fastft.compile import apply_compile
from fastft.config import FinetuneConfig
from fastft.data.text import TextIndex, index_text
from fastft.data.text_loader import TextLoader
from fastft.data.text_tokens import Tokens, default_cache_dir, tokenize_file
from fastft.errors import ConfigError, DataError
from fastft.parallel import env as penv

log = logging.getLogger("fastft")


def check_text_config(cfg: FinetuneConfig) -> None:
    """Refuse what the text path does not do (yet), naming the key."""
    if cfg.data.loader in ("dali", "synthetic"):
        raise ConfigError(
            f"data.loader: {cfg.data.loader} loads images; model.source=hf reads text (use data.loader=auto or torch)"
        )
    if cfg.features.cache != "off" and cfg.model.freeze != "backbone":
        raise ConfigError(
            f"features.cache: a text model caches the pooled output of a frozen encoder only (model.freeze=backbone, "
            f"not {cfg.model.freeze!r})"
        )
    if cfg.features.cache != "off" and cfg.features.views:
        raise ConfigError("features.views: text rows have no augmented views (use 0)")


def text_index(cfg: FinetuneConfig) -> TextIndex:
    """The run's text index (classes, train and val rows) after the text path's config checks."""
    check_text_config(cfg)
    index = index_text(cfg.data, seed=cfg.run.seed)
    if not index.val:
        raise DataError(f"{cfg.data.train_list}: no validation rows: set data.val_list or raise data.val_fraction")
    return index


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The token tensors the model takes (the loader's row `index` is left out)."""
    return {k: batch[k] for k in INPUT_KEYS if k in batch}


def _cast(x, dtype: torch.dtype | None):
    """`x` (a tensor or a dict of tensors) with its floating tensors in `dtype`; token ids and masks keep theirs."""
    if dtype is None:
        return x
    if isinstance(x, Mapping):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


def _dynamic(x):
    """`x` with its batch dimension (and a token dimension: input ids, masks, hidden states) marked dynamic for
    torch.compile: text batches vary in rows and length, so one graph serves them all instead of one per shape
    (apply_compile's dynamic=False would otherwise recompile at each new length). A no-op when nothing is compiled."""
    from torch._dynamo import maybe_mark_dynamic

    for t in x.values() if isinstance(x, Mapping) else (x,):
        maybe_mark_dynamic(t, [0, 1] if isinstance(x, Mapping) else 0)
    return x


def _tokens(index: TextIndex, spec: TextSpec, env: penv.DistEnv) -> tuple[Tokens, Tokens]:
    """(train tokens, val tokens). Each node's first process tokenises and writes the cache; the others read it
    after a barrier, so every file is tokenised once per node."""

    def read() -> tuple[Tokens, Tokens]:
        train = tokenize_file(index.train.file, spec, cache_dir=default_cache_dir())
        same = index.val.file is index.train.file  # a val_fraction split: one file
        val = train if same else tokenize_file(index.val.file, spec, cache_dir=default_cache_dir())
        return train, val

    if env.local_rank == 0:
        tokens = read()
        penv.barrier(env)
    else:
        penv.barrier(env)
        tokens = read()
    return tokens


class TextInputs:
    """The train and val TextLoaders of a text run and the frozen prefix their batches go through.

    Args:
        cfg: the run's config (data.batch_size, data.eval_batch_size, run.seed are read).
        index: the text index (fastft.data.text.TextIndex).
        spec: the tokenizer folder and max_length (TextSpec).
        cached: train a linear probe from the pooled-output cache (built by build_cache).
        opened: the loaders are appended, so the caller closes them also on failure.
    """

    def __init__(self, cfg: FinetuneConfig, env: penv.DistEnv, index, spec, *, cached: bool, opened: list) -> None:
        self.cfg, self.env, self.index, self.spec = cfg, env, index, spec
        self.cached = cached
        self.eval_batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
        self.prefix: torch.nn.Module | None = None
        self.cache_info: dict = {}
        self.skipped: list[str] = []  # text rows are all checked when read: a bad row is an error, never skipped
        self.tokens = _tokens(index, spec, env)
        common = {"seed": cfg.run.seed, "rank": env.rank, "world": env.world_size}
        balanced = cfg.data.sampler == "balanced"
        self.train = TextLoader(
            index.train, self.tokens[0], train=True, batch_size=cfg.data.batch_size, balanced=balanced, **common
        )
        self.val = TextLoader(index.val, self.tokens[1], train=False, batch_size=self.eval_batch_size, **common)
        self.token_loaders = (self.train, self.val)
        opened += [self.train, self.val]

    @property
    def num_samples(self) -> int:
        """Rows this rank trains on per epoch."""
        return self.train.num_samples

    def start(self, epoch: int, batch: int, *, training_left: bool) -> None:
        if training_left:
            self.train.start(epoch, batch)

    def build_cache(self, prefix: torch.nn.Module | None, precision) -> None:
        """Compute (or reuse) the pooled features of the train and val rows through the frozen encoder `prefix`;
        from here on the loaders yield features, batched as the token loaders would batch their rows."""
        if not self.cached:
            return
        from fastft.text_features import check_probe

        check_probe(prefix)
        self.train, self.val, self.cache_info = _cached_loaders(self, prefix, precision)

    def invalidate(self) -> None:
        """An unfreeze moved the cut: the cached features are stale, train from the tokens."""
        self.cached = False
        self.train, self.val = self.token_loaders

    def use_prefix(self, prefix: torch.nn.Module | None, *, compile_cfg=None) -> None:
        """The frozen prefix token batches go through (compiled when `compile_cfg` is given); none while cached."""
        self.prefix = None if self.cached else prefix
        if self.prefix is not None and compile_cfg is not None:
            self.prefix = apply_compile(self.prefix, compile_cfg)

    def to_device(self, batch: Mapping[str, torch.Tensor] | torch.Tensor, labels: torch.Tensor, device):
        """The model's token tensors (row indices left out), or cached features, and the labels on `device`."""
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        moved = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
        return moved, labels.to(device, non_blocking=True)

    def features(self, batch: Mapping[str, torch.Tensor], precision, dtype: torch.dtype | None):
        """What the trainable part takes: the prefix's output (pooled tensor, or hidden states + mask), or the token
        tensors themselves when nothing is frozen before it; floating tensors in `dtype` when set."""
        if self.prefix is None:  # cached features, or nothing frozen before the trainable part
            return _dynamic(_cast(batch if isinstance(batch, torch.Tensor) else dict(batch), dtype))
        # The frozen prefix builds no autograd graph; clone turns its inference tensors into normal ones.
        with torch.inference_mode(), precision.autocast():
            out = self.prefix(_dynamic(batch))
        out = {k: v.clone() for k, v in out.items()} if isinstance(out, Mapping) else out.clone()
        return _dynamic(_cast(out, dtype))

    def eval_forward(self, suffix: torch.nn.Module, dtype: torch.dtype | None) -> Callable:
        """The evaluation forward: prefix (eval mode) then `suffix`, on a batch of token tensors."""
        prefix = self.prefix
        if prefix is not None:
            prefix.eval()

        def forward(batch: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
            x = _dynamic(batch if isinstance(batch, torch.Tensor) else model_inputs(batch))  # a tensor: cached features
            return suffix(_dynamic(_cast(prefix(x) if prefix is not None else x, dtype)))

        return forward


def _cached_loaders(inputs: TextInputs, prefix: torch.nn.Module, precision):
    """(train loader, val loader, build info) over the pooled features of the train and val rows."""
    from fastft.features import build_features
    from fastft.inputs import cache_options, log_cache_built
    from fastft.text_features import TextFeatureLoader, TextSource

    cfg, env, index = inputs.cfg, inputs.env, inputs.index
    common = cache_options(cfg, env, precision, channels_last=False)
    t0 = time.perf_counter()
    tables = []
    for split, tokens, train in ((index.train, inputs.tokens[0], True), (index.val, inputs.tokens[1], False)):
        source = TextSource(
            split, tokens, inputs.spec, rank=env.rank, world=env.world_size, batch_size=inputs.eval_batch_size
        )
        tables.append(build_features(prefix, source, train=train, **common))
    build_s = time.perf_counter() - t0
    log_cache_built(cfg, tables[0].source, tables[1].source, build_s)
    loaders = [TextFeatureLoader(t, like) for t, like in zip(tables, inputs.token_loaders)]
    info = {"wall_s": build_s, "rows": sum(t.num_samples for t in tables), "train": tables[0].source}
    info["val"] = tables[1].source
    return loaders[0], loaders[1], info
