"""Run configuration: nested dataclasses are the schema, a TOML file plus `--section.key=value` overrides a run.

The defaults below are the documentation. Every component takes its own section (``cfg.optim``, ``cfg.data``, ...),
never the whole config. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastft.errors import ConfigError


@dataclass
class ModelConfig:
    source: str = "torchvision"  # torchvision | timm | hf (a Hugging Face text encoder)
    name: str = "resnet18"  # a torchvision or timm model name; for hf a local folder or a hub-cache model id
    weights: str = "DEFAULT"  # DEFAULT | a weights enum name (IMAGENET1K_V2) | none | path to .pt/.pth/.safetensors
    num_classes: int = 0  # 0 = infer from the data
    freeze: str | list[str] = "backbone"  # none | backbone | until:<module> | [name patterns to freeze]
    head_hidden: int = 0  # >0 adds a hidden layer (Linear -> ReLU -> Dropout) before the classifier
    head_dropout: float = 0.0
    channels_last: bool = True  # NHWC activations: faster convolutions on GPUs and on CPUs with oneDNN
    fold_bn: bool = True  # the frozen part runs with its BatchNorms folded into their convolutions (a copy of those)
    grad_checkpointing: bool = False  # the old name of activation_checkpointing (either switches it on)
    activation_checkpointing: bool = False  # recompute the trainable blocks' activations in backward: less memory
    drop_path: float = -1.0  # stochastic depth rate of the deepest block; -1 = the model's own default, 0 = off


@dataclass
class HeadConfig:
    sweep_lr: list[float] = field(default_factory=list)  # train one head per LR side by side (linear probe)
    sweep_weight_decay: list[float] = field(default_factory=list)  # optional: the grid lr x weight decay


@dataclass
class DataConfig:
    root: str = ""  # ImageFolder root: root/train + root/val, or class folders split by val_fraction
    train_dir: str = "train"
    val_dir: str = "val"
    val_fraction: float = 0.2  # used only when root has no train/val folders
    train_list: str = ""  # CSV of path,label (alternative to root)
    val_list: str = ""
    image_size: int = 0  # 0 = the weights' preset crop size
    max_length: int = 128  # text: tokens per row (longer rows are truncated; batches pad to their longest row)
    batch_size: int = 32
    eval_batch_size: int = 0  # 0 = batch_size
    workers: int = 2
    loader: str = "auto"  # auto | torch | dali | synthetic (auto: dali when installed and on a GPU, else torch)
    augment: bool = True  # RandomResizedCrop + flip for training; false = the eval transform
    pin_memory: bool = True
    persistent_workers: bool = True
    on_bad_file: str = "error"  # error | skip
    sampler: str = "shuffle"  # shuffle | balanced (each epoch: n draws with replacement, every class equally likely)
    task: str = "multiclass"  # multiclass (one label per image) | multilabel (a set per image: train_list path,labels)


@dataclass
class AugmentConfig:
    """Training augmentation beyond data.augment's crop + flip (fastft/augment.py, data/transforms.py)."""

    policy: str = "none"  # none | randaugment | trivialaugment | autoaugment (torchvision.transforms.v2, per sample)
    random_erase: float = 0.0  # probability of erasing one random rectangle per sample (RandomErasing)
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength in [0, 1] (0 = off)
    mixup_alpha: float = 0.0  # >0: MixUp with lambda ~ Beta(alpha, alpha), on the device after the loader
    cutmix_alpha: float = 0.0  # >0: CutMix (with mixup_alpha too: one of the two per batch, at random)
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup_alpha or cutmix_alpha > 0)

    def pixel_options(self) -> list[str]:
        """The per-sample (pixel) options that are on, as `augment.key` names."""
        on = [("policy", self.policy != "none"), ("random_erase", self.random_erase > 0)]
        on.append(("color_jitter", self.color_jitter > 0))
        return [f"augment.{k}" for k, v in on if v]

    def mix_options(self) -> list[str]:
        """The batch-mixing options that are on (MixUp / CutMix)."""
        return [f"augment.{k}" for k in ("mixup_alpha", "cutmix_alpha") if getattr(self, k) > 0]


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | focal (-(1 - p)^focal_gamma * log p, p the label's softmax probability)
    focal_gamma: float = 2.0
    class_weights: str | list[float] = "none"  # none | balanced (from the training labels) | [w1, ..., wK]
    grad_accum: int = 1
    clip_grad_norm: float = 0.0  # 0 = off
    epochs: int = 5
    max_steps: int = 0  # >0 stops after this many optimizer steps (overrides epochs)
    layer_decay: float = 1.0  # layer-wise LR decay: a stage at depth d from the head gets lr * layer_decay**d
    unfreeze: list[str] = field(default_factory=list)  # gradual unfreezing: ["EPOCH:module[:lr_factor]", ...]
    ema_decay: float = 0.0  # EMA of the trainable weights (0 = off): ema = decay * ema + (1 - decay) * weights
    ema_every: int = 1  # average every N optimizer steps


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 where the device has native bf16, else fp32)


@dataclass
class CompileConfig:
    target: str = "auto"  # auto | none | head | all  (auto: head or none, measured: fastft/compile.py)
    mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune
    backend: str = "inductor"


@dataclass
class ParallelConfig:
    backend: str = "auto"  # auto | none | ddp | deepspeed (auto: ddp when WORLD_SIZE > 1)
    timeout_s: int = 600  # collective timeout: a dead rank ends the job instead of hanging
    deepspeed_config: str = ""  # optional user JSON merged over the generated DeepSpeed config
    zero_stage: int = 0
    sync_bn: str = "auto"  # auto | on | off: SyncBatchNorm in the trainable part under DDP (auto: on with GPUs when
    # it holds trainable BatchNorm; CPU falls back to per-rank statistics, logged)


@dataclass
class FeaturesConfig:
    cache: str = "off"  # off | memory | disk: run the frozen prefix once and train later epochs from its outputs
    views: int = 0  # 0 = no training augmentation (eval transform); K = K fixed augmented views, view epoch % K
    dtype: str = "fp16"  # fp16 | fp32 storage
    dir: str = ""  # disk cache folder ("" = $FASTFT_CACHE/features or ~/.cache/fastft/features)


@dataclass
class EvalConfig:
    threshold: float = 0.5  # multilabel: a label is predicted when its sigmoid probability is above this
    tune_thresholds: bool = False  # multilabel: also tune a threshold per label on validation (F1), kept with the model


@dataclass
class CheckpointConfig:
    every_epochs: int = 1  # save last.pt every N epochs (0 = only at the end)
    every_steps: int = 0  # also save last.pt every N optimizer steps (0 = off)
    best_metric: str = "f1_macro"  # any key of the evaluation report
    best_mode: str = "max"  # max | min
    patience: int = 0  # early stopping: end after N evaluations without an improvement of best_metric (0 = off)
    min_delta: float = 0.0  # what counts as an improvement for patience: better than the last one by more than this
    resume: str = ""  # "" | auto (the run folder's last.pt) | path to a checkpoint


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True
    every_steps: int = 10  # JSON-lines + TensorBoard step logging cadence
    step_timing: bool = False  # per-step time breakdown (synchronises the device: for benchmarks)


@dataclass
class RunConfig:
    out_dir: str = "runs"
    name: str = ""  # "" = <model>-<timestamp>
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    overwrite: bool = False  # reuse an existing run folder that is not being resumed
    eval_every_epochs: int = 1


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> FinetuneConfig:
        """Check values and relations between them; raise ConfigError naming the key."""
        _choice("model.source", self.model.source, ("torchvision", "timm", "hf"))
        _choice("model.weights", self.model.weights, None)
        _min("model.num_classes", self.model.num_classes, 0)
        _min("model.head_hidden", self.model.head_hidden, 0)
        _range("model.head_dropout", self.model.head_dropout, 0.0, 1.0, hi_open=True)
        _check_memory_keys(self.model)
        if isinstance(self.model.freeze, str):
            f = self.model.freeze
            if f not in ("none", "backbone") and not (f.startswith("until:") and len(f) > len("until:")):
                raise ConfigError(f"model.freeze: expected none | backbone | until:<module> | [patterns], got {f!r}")
        if any(not 0 < lr < math.inf for lr in self.head.sweep_lr):
            raise ConfigError(f"head.sweep_lr: every LR must be finite and > 0, got {self.head.sweep_lr}")
        if any(not 0 <= wd < math.inf for wd in self.head.sweep_weight_decay):
            raise ConfigError(f"head.sweep_weight_decay: must be finite and >= 0, got {self.head.sweep_weight_decay}")
        _range("data.val_fraction", self.data.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        _min("data.image_size", self.data.image_size, 0)
        _min("data.max_length", self.data.max_length, 1)
        _min("data.batch_size", self.data.batch_size, 1)
        _min("data.eval_batch_size", self.data.eval_batch_size, 0)
        _min("data.workers", self.data.workers, 0)
        _choice("data.loader", self.data.loader, ("auto", "torch", "dali", "synthetic"))
        _choice("data.on_bad_file", self.data.on_bad_file, ("error", "skip"))
        _check_augment(self)
        _choice("data.sampler", self.data.sampler, ("shuffle", "balanced"))
        _check_task(self)
        _choice("optim.name", self.optim.name, ("sgd", "adamw"))
        if not 0 < self.optim.lr < math.inf:
            raise ConfigError(f"optim.lr: must be finite and > 0, got {self.optim.lr}")
        _range("optim.momentum", self.optim.momentum, 0.0, 1.0, hi_open=True)
        _min("optim.weight_decay", self.optim.weight_decay, 0.0)
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.optim.betas}")
        _choice("optim.schedule", self.optim.schedule, ("cosine", "constant"))
        _min("optim.warmup_steps", self.optim.warmup_steps, 0)
        _range("optim.min_lr_ratio", self.optim.min_lr_ratio, 0.0, 1.0)
        _range("optim.label_smoothing", self.optim.label_smoothing, 0.0, 1.0, hi_open=True)
        _choice("optim.loss", self.optim.loss, ("ce", "focal"))
        _min("optim.focal_gamma", self.optim.focal_gamma, 0)
        if self.optim.loss == "focal" and self.optim.label_smoothing:
            raise ConfigError("optim.loss = focal does not take optim.label_smoothing (set it to 0)")
        if isinstance(self.optim.class_weights, str):
            _choice("optim.class_weights", self.optim.class_weights, ("none", "balanced"))
        _min("optim.grad_accum", self.optim.grad_accum, 1)
        _min("optim.clip_grad_norm", self.optim.clip_grad_norm, 0.0)
        _min("optim.epochs", self.optim.epochs, 1)
        _min("optim.max_steps", self.optim.max_steps, 0)
        _range("optim.layer_decay", self.optim.layer_decay, 0.0, 1.0, lo_open=True)
        parse_unfreeze(self.optim.unfreeze)
        _check_ema(self)
        _choice("precision.dtype", self.precision.dtype, ("auto", "bf16", "fp16", "fp32"))
        _choice("compile.target", self.compile.target, ("auto", "none", "head", "all"))
        _choice(
            "compile.mode",
            self.compile.mode,
            ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        )
        _choice("parallel.backend", self.parallel.backend, ("auto", "none", "ddp", "deepspeed"))
        _min("parallel.timeout_s", self.parallel.timeout_s, 1)
        _choice("parallel.zero_stage", self.parallel.zero_stage, (0, 1, 2))  # params stay whole for export
        _choice("parallel.sync_bn", self.parallel.sync_bn, ("auto", "on", "off"))
        _choice("features.cache", self.features.cache, ("off", "memory", "disk"))
        _min("features.views", self.features.views, 0)
        _choice("features.dtype", self.features.dtype, ("fp16", "fp32"))
        _min("checkpoint.every_epochs", self.checkpoint.every_epochs, 0)
        _min("checkpoint.every_steps", self.checkpoint.every_steps, 0)
        _choice("checkpoint.best_mode", self.checkpoint.best_mode, ("max", "min"))
        _min("checkpoint.patience", self.checkpoint.patience, 0)
        _min("checkpoint.min_delta", self.checkpoint.min_delta, 0)
        _min("log.every_steps", self.log.every_steps, 1)
        _min("run.eval_every_epochs", self.run.eval_every_epochs, 1)
        dev = self.run.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"run.device: expected auto | cpu | cuda | cuda:N, got {dev!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_task(cfg: FinetuneConfig) -> None:
    """`data.task` and `eval.threshold`; the options a multilabel run cannot take (one line naming the option)."""
    _choice("data.task", cfg.data.task, ("multiclass", "multilabel"))
    _range("eval.threshold", cfg.eval.threshold, 0.0, 1.0, lo_open=True, hi_open=True)
    if cfg.data.task != "multilabel":
        if cfg.eval.tune_thresholds:
            raise ConfigError("eval.tune_thresholds: only with data.task = multilabel (a single label is the argmax)")
        return
    if not cfg.data.train_list:
        raise ConfigError("data.train_list: data.task = multilabel reads label sets from a CSV/JSONL of path,labels")
    o = cfg.optim
    refused = [
        ("model.source = hf", cfg.model.source == "hf", "text models take one label per row"),
        ("data.loader = synthetic", cfg.data.loader == "synthetic", "synthetic batches carry class indices"),
        ("data.sampler = balanced", cfg.data.sampler == "balanced", "it draws by one class per image"),
        ("optim.loss = focal", o.loss == "focal", "the loss is BCEWithLogits"),
        ("optim.class_weights", o.class_weights != "none", "no per-class weights for BCEWithLogits here; use none"),
        ("optim.label_smoothing", o.label_smoothing > 0, "the loss is BCEWithLogits; set it to 0"),
        ("head.sweep_lr", bool(cfg.head.sweep_lr), "the head sweep ranks heads by multiclass metrics"),
    ]
    refused += [(k, True, "it mixes one-hot class targets") for k in cfg.augment.mix_options()]
    for key, on, why in refused:
        if on:
            raise ConfigError(f"{key}: not with data.task = multilabel ({why})")


def _check_augment(cfg: FinetuneConfig) -> None:
    """`[augment]` values, and the combinations that cannot take them (one line naming the option)."""
    a = cfg.augment
    _choice("augment.policy", a.policy, ("none", "randaugment", "trivialaugment", "autoaugment"))
    _range("augment.random_erase", a.random_erase, 0.0, 1.0)
    _range("augment.color_jitter", a.color_jitter, 0.0, 1.0)
    _min("augment.mixup_alpha", a.mixup_alpha, 0.0)
    _min("augment.cutmix_alpha", a.cutmix_alpha, 0.0)
    _range("augment.mix_prob", a.mix_prob, 0.0, 1.0)
    on = a.pixel_options() + a.mix_options()
    if not on:
        return
    if cfg.model.source == "hf":
        raise ConfigError(f"{on[0]}: image augmentation does not apply to text models (model.source = hf)")
    if not cfg.data.augment:
        raise ConfigError(f"{on[0]}: needs data.augment = true (data.augment = false trains on the eval transform)")
    if cfg.features.cache != "off":
        raise ConfigError(
            f"{on[0]}: not with features.cache = {cfg.features.cache} (cached features are computed once, before "
            "any per-sample or per-batch augmentation); set features.cache = off"
        )
    if a.pixel_options() and cfg.data.loader == "synthetic":
        raise ConfigError(
            f"{a.pixel_options()[0]}: not with data.loader = synthetic (its batches are generated tensors, not decoded "
            "images); use data.loader = torch"
        )
    if a.pixel_options() and cfg.data.loader == "dali":
        raise ConfigError(
            f"{a.pixel_options()[0]}: not with data.loader = dali (its per-sample draws would not follow the run's "
            "(seed, epoch, sample) seeds); use data.loader = torch"
        )
    if a.mix_options() and cfg.optim.loss == "focal":
        raise ConfigError(f"{a.mix_options()[0]}: not with optim.loss = focal (it takes hard labels); use ce")


def check_device(key: str, name: str) -> None:
    """A CUDA device that this machine does not have is a one-line error (before torch initialises CUDA)."""
    if not name.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name[5:]) if name.startswith("cuda:") else 0
    if count == 0:
        raise ConfigError(f"{key}: {name!r} asked for, but no CUDA device is available here (use cpu or auto)")
    if index >= count:
        raise ConfigError(
            f"{key}: {name!r} asked for, but this machine has {count} CUDA device(s) (cuda:0..{count - 1})"
        )


@dataclass(frozen=True)
class UnfreezeStep:
    epoch: int  # 1-based: applied before that epoch's first batch
    module: str
    lr_factor: float = 1.0


def parse_unfreeze(entries: list[str]) -> list[UnfreezeStep]:
    steps = []
    for i, entry in enumerate(entries):
        parts = entry.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            epoch, module = int(parts[0]), parts[1]
            factor = float(parts[2]) if len(parts) == 3 else 1.0
            if epoch < 2 or not module or not 0 < factor < math.inf:
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"optim.unfreeze[{i}]: expected 'EPOCH:module[:lr_factor]' with EPOCH >= 2 and "
                f"a finite lr_factor > 0, got {entry!r}"
            ) from None
        steps.append(UnfreezeStep(epoch, module, factor))
    return sorted(steps, key=lambda s: s.epoch)


def _check_ema(cfg: FinetuneConfig) -> None:
    """optim.ema_decay / ema_every, and the combinations the EMA does not cover (one line each)."""
    o = cfg.optim
    _range("optim.ema_decay", o.ema_decay, 0.0, 1.0, hi_open=True)
    _min("optim.ema_every", o.ema_every, 1)
    if cfg.checkpoint.best_metric.startswith("ema/") and not o.ema_decay:
        raise ConfigError(f"checkpoint.best_metric: {cfg.checkpoint.best_metric!r} needs optim.ema_decay > 0")
    if not o.ema_decay:
        return
    for key, on in (
        ("head.sweep_lr", bool(cfg.head.sweep_lr)),  # a bank of heads, one kept at the end: no EMA of it
        ("optim.unfreeze", bool(o.unfreeze)),  # an unfreeze changes what the EMA would hold
        ("parallel.backend=deepspeed", cfg.parallel.backend == "deepspeed"),  # its fp32 masters are not averaged
    ):
        if on:
            raise ConfigError(f"optim.ema_decay: not supported with {key}")


def _check_memory_keys(m: ModelConfig) -> None:
    """model.drop_path and model.activation_checkpointing (fastft.act_ckpt): image models only."""
    if m.drop_path != -1:
        _range("model.drop_path", m.drop_path, 0.0, 1.0, hi_open=True)
    for key, on in (("drop_path", m.drop_path > 0), ("activation_checkpointing", m.activation_checkpointing)):
        if on and m.source == "hf":
            raise ConfigError(f"model.{key}: not available for model.source=hf (torchvision and timm models)")
    if m.source == "timm" and m.drop_path > 0 and (m.activation_checkpointing or m.grad_checkpointing):
        if m.freeze != "none":  # timm's checkpointed model is not split: its frozen blocks would drop paths in training
            raise ConfigError("model.drop_path: with activation checkpointing a timm model needs model.freeze = none")


def _choice(key: str, value: Any, allowed: tuple | None) -> None:
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{key}: expected one of {' | '.join(map(str, allowed))}, got {value!r}")


def _min(key: str, value: float, lo: float) -> None:
    if not lo <= value < math.inf:  # written so that NaN fails too; no numeric field means anything at infinity
        raise ConfigError(f"{key}: must be finite and >= {lo}, got {value}")


def _range(key: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> None:
    bad = not (lo <= value <= hi) or (lo_open and value == lo) or (hi_open and value == hi)  # NaN is bad too
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{key}: must be in {lb}{lo}, {hi}{rb}, got {value}")


# --------------------------------------------------------------------------------------------------------------------
# Building a config from dicts, TOML files and overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (TOML types); ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is type(None):
        if value is None:
            return None
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a [{full}] table, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> FinetuneConfig:
    """Build and validate a config from a nested dict (as read from TOML)."""
    return _build(FinetuneConfig, data, "").validate()


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML value, falling back to a bare string (`--model.name=resnet50`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override --{dotted}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def _field_type(dotted: str) -> Any:
    cls: Any = FinetuneConfig
    tp: Any = None
    for p in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if p not in hints:
            return None
        tp = cls = hints[p]
    return tp


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (leading dashes optional) to a nested dict, in order."""
    for item in overrides:
        item = item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        key, text = item.split("=", 1)
        value = _parse_value(text)
        tp = _field_type(key)
        # A string field keeps the literal text: `--run.name=123` is the name "123", not the integer 123.
        if tp is str and not isinstance(value, str):
            value = text
        _set_path(data, key, value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a TOML run file (optional), apply overrides and validate."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a UTF-8 text file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def to_toml(cfg: FinetuneConfig) -> str:
    """Render a config as TOML (written into every run folder as config.toml)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string, control characters escaped
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot render {v!r} as TOML")
