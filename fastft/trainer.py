"""The fine-tuning run as a Trainer: setup(cfg) builds the run's state, then the loop reads top to bottom.

Order of construction (each a verb or component from its own module):
    data index -> resume checkpoint read and checked -> inputs (every file checked; the first epoch's loading, or the
    feature cache's decode, starts here and overlaps the rest of the set-up) -> build model (weights, new head)
    -> freeze -> device + channels_last -> split prefix/suffix -> optimizer + schedule -> precision -> feature cache
    -> backend -> compile suffix -> backend.wrap(suffix) -> resume state -> run folder opened
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastft import act_ckpt, early_stop, thresholds, timing
from fastft import checkpoint as ckpt_io
from fastft import resume as resume_rules
from fastft.augment import BatchMix, batch_mix
from fastft.backbones import Backbone, build_backbone, preprocess_spec, trace_options
from fastft.backbones.freeze import freeze
from fastft.backbones.hf_text import split_text
from fastft.backbones.split import split_model
from fastft.checkpoint import Checkpointer, refuse_nonfinite
from fastft.compile import apply_compile, run_target
from fastft.config import FinetuneConfig, UnfreezeStep, check_device, parse_unfreeze
from fastft.data.index import index_from_config
from fastft.data.multilabel import index_multilabel
from fastft.ema import Ema, build_ema, picks_ema
from fastft.errors import ConfigError, FastftError
from fastft.evaluation import run_evaluation
from fastft.inputs import Inputs
from fastft.logging import RunLogger
from fastft.losses import Loss, MultilabelLoss, class_weights
from fastft.optim import Schedule, build_optimizer, param_groups
from fastft.parallel import env as penv
from fastft.parallel.backend import Backend, build_backend, sync_buffers
from fastft.parallel.deepspeed import DeepSpeedOptions
from fastft.precision import resolve_precision
from fastft.preflight import check_before_training
from fastft.report import format_table, write_report
from fastft.run_dir import open_run_dir, prepare_run_dir
from fastft.sweep import Sweep
from fastft.timing import Phases, StepTimer
from fastft.unfreeze import unfreeze_module

log = logging.getLogger("fastft")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict  # the final evaluation report
    best: dict = field(default_factory=dict)  # {"metric", "value", "epoch"}
    paths: dict[str, Path] = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)  # img/s per epoch (global, all ranks)
    steps: int = 0
    timings: dict = field(default_factory=dict)  # per epoch: seconds per segment (log.step_timing), wall, images
    skipped_steps: int = 0  # fp16 steps skipped by the loss scaler (overflow)
    feature_cache: dict = field(default_factory=dict)  # {wall_s, images, train, val}: the cache build (or reuse)
    phases: dict = field(default_factory=dict)  # {"setup": {phase: s, "total"}, "teardown": {...}}


@dataclass
class Run:
    """Everything a run holds: built by setup(), read and advanced by the loop's functions."""

    cfg: FinetuneConfig
    env: penv.DistEnv
    run_dir: Path
    resume_from: Path | None
    index: object
    num_classes: int
    inputs: Inputs  # or fastft.text_inputs.TextInputs (model.source=hf): the same interface
    model: torch.nn.Module
    source: _ModelSource  # the model source: its Backbone (head, stages, preprocessing) and the split
    split: object  # fastft.model.Split: prefix + trainable suffix (the sweep's bank when sweeping)
    sweep: Sweep | None
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    precision: object
    backend: Backend
    target: str  # what torch.compile covers: none | head | all
    plan: list[UnfreezeStep]  # unfreezes still to come
    epochs: int
    steps_per_epoch: int
    total_steps: int
    meta: dict = field(default_factory=dict)
    checkpointer: Checkpointer | None = None
    logger: RunLogger | None = None
    stop: penv.StopSignal | None = None
    train_module: torch.nn.Module | None = None  # the wrapped (and compiled) suffix the step calls
    suffix: torch.nn.Module | None = None  # the compiled suffix, unwrapped (evaluation)
    ema: Ema | None = None  # optim.ema_decay: the EMA of the trainable suffix
    # Progress: the position, counters and results the loop advances.
    step: int = 0
    start_epoch: int = 0
    start_batch: int = 0
    resumed_stats: dict | None = None  # a partial epoch's loss sums (resume inside an epoch)
    loss: Loss | MultilabelLoss | None = None  # the training loss (optim.loss, optim.class_weights, data.task)
    mix: BatchMix | None = None  # MixUp / CutMix of each batch on the device (augment.*)
    best: dict = field(default_factory=dict)
    early_stop: dict | None = None  # {"epoch", "reason"}: the run stopped before its last epoch (checkpoint.patience)
    report: dict = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    timings: dict[str, dict] = field(default_factory=dict)  # per epoch
    phase_s: dict[str, dict] = field(default_factory=dict)  # "setup" and "teardown": seconds per phase
    phases: Phases | None = None  # the set-up's phases
    teardown: Phases | None = None  # the last epoch's evaluation and saves, then finish()'s outputs

    @property
    def device(self) -> torch.device:
        return self.env.device


@dataclass
class EpochStats:
    """An epoch's running loss (summed on the device: no host sync per step) and images seen by this rank."""

    loss_sum: torch.Tensor
    loss_n: int = 0
    seen: int = 0

    def saved(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "loss_n": self.loss_n, "seen": self.seen}


# --------------------------------------------------------------------------------------------------------------------
# Small verbs used by the loop


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)  # same on every rank: heads start identical (DDP also broadcasts at wrap)


def seed_rank_streams(seed: int, rank: int, world_size: int) -> None:
    """Once the model is built and wrapped (so heads start identical): give each rank its own torch stream, so dropout
    and stochastic depth draw different masks on each rank's samples. (Resume then restores each rank's saved state.)"""
    if world_size > 1:
        torch.manual_seed(seed + rank)


class _ModelSource:
    """Every model-building call of a run in one place, through the model source's Backbone
    (fastft.backbones): preprocessing spec, weights + new head, freezing by its head and stages, the split."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.backbone: Backbone | None = None

    @property
    def head(self) -> str:
        return self.backbone.head

    def spec(self):
        return preprocess_spec(self.cfg.model, self.cfg.data.image_size, max_length=self.cfg.data.max_length)

    def build(
        self, num_classes: int, image_size: int, *, labels: list[str] | None = None
    ) -> tuple[torch.nn.Module, tuple[int, int]]:
        """The model with its new head, frozen as configured: (model, (trainable, total) parameter counts)."""
        data = self.cfg.data
        self.backbone = build_backbone(
            self.cfg.model, num_classes, image_size=image_size, max_length=data.max_length, labels=labels
        )
        model = self.backbone.model
        trainable, total = freeze(model, self.cfg.model.freeze, head=self.head, stages=self.backbone.stages())
        log.info(
            "fastft: %s, freeze=%s: %s of %s parameters train (%.2f%%)",
            self.cfg.model.name,
            self.cfg.model.freeze,
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
        return model, (trainable, total)

    def split(self, model: torch.nn.Module):
        if self.backbone.source == "hf":  # a text encoder is cut at its stages (no torch.fx trace of HF models)
            return split_text(self.backbone, {n for n, p in model.named_parameters() if p.requires_grad})
        on = act_ckpt.enabled(self.cfg.model) and self.backbone.source == "torchvision"  # timm: its own switch
        trace = dataclasses.replace(trace_options(model), leaf_names=act_ckpt.apply(model, on=on))
        return split_model(model, head=self.head, trace=trace)

    def param_groups(self, model: torch.nn.Module, names: list[str], cfg, **kw) -> list[dict]:
        return param_groups(model, names, cfg, head=self.head, stages=self.backbone.stages(), **kw)


# --------------------------------------------------------------------------------------------------------------------
# The run


def finetune(cfg: FinetuneConfig) -> RunResult:
    """Fine-tune and evaluate as configured; usable in-process (no global state is left behind).

    Returns:
        RunResult with the final evaluation report, the best metric, the output paths and throughput.
    Raises:
        FastftError (ConfigError, DataError, ModelError, CheckpointError) for bad input.
    """
    cfg.validate()
    check_device("run.device", cfg.run.device)
    env = penv.init_distributed(cfg.run.device, timeout_s=cfg.parallel.timeout_s)
    prev_det = torch.are_deterministic_algorithms_enabled()
    opened: list = []  # loaders and feature sources: their workers end with the run, also when it fails
    try:
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        phases = Phases()
        started, timing.PROCESS_T0 = timing.PROCESS_T0, None  # this run's only: a later in-process run has none
        if started is not None:  # the command line: its imports and config reading come first
            phases.add("imports", time.perf_counter() - started)
            phases.restart()
        run = setup(cfg, env, opened, phases)
        for epoch in range(run.start_epoch, run.epochs):
            if run.step >= run.total_steps or run.early_stop:
                break
            unfreeze_due(run, epoch)
            train_loss, img_s = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, train_loss, img_s)
        return finish(run)
    finally:
        for source in opened:
            source.close()
        torch.use_deterministic_algorithms(prev_det)
        penv.shutdown(env)


def setup(cfg: FinetuneConfig, env: penv.DistEnv, opened: list, phases: Phases | None = None) -> Run:
    """Build the run's state in the order of the module docstring; every refusal comes before the run folder is
    touched. `opened` collects what must be closed when the run ends; `phases` gets the seconds of each step."""
    lap = (phases or Phases()).lap
    stop = penv.StopSignal(env)  # closed with the loaders: the caller's signal handlers come back
    opened.append(stop)
    seed_everything(cfg.run.seed, env.rank)
    index, num_classes = _index(cfg)
    lap("index")
    run_dir, resume_from = prepare_run_dir(cfg, env)
    state = _read_resume(cfg, env, index, resume_from)
    pos = (state["epoch"], state["batch"]) if state is not None else None
    plan, replayed = _unfreeze_plan(cfg, pos)
    lap("run_folder")

    source = _ModelSource(cfg)
    spec = source.spec()
    # After a replayed unfreeze the original run went uncached too.
    inputs = _data(cfg)[1](cfg, env, index, spec, cached=cfg.features.cache != "off" and not replayed, opened=opened)
    epochs, steps_per_epoch, total_steps = _lengths(cfg, env, len(inputs.train), len(index.train))
    start_epoch, start_batch = pos or (0, 0)
    resumed_step = state["step"] if state is not None else 0
    inputs.start(start_epoch, start_batch, training_left=start_epoch < epochs and resumed_step < total_steps)
    lap("loaders")  # every file checked, the first batches' decode started

    model, counts = source.build(num_classes, getattr(spec, "crop_size", 0), labels=index.classes)  # text: no crop
    checks = {"num_classes": num_classes, "plan": plan, "epochs": epochs, "total_steps": total_steps}
    check_before_training(cfg, model=model, world_size=env.world_size, main=env.is_main, **checks)
    optimizer, split, sweep = _place(cfg, model, source, replayed, env.device)

    # Precision, then (optionally) the frozen-feature cache: from here on, a cached run's "images" are the prefix
    # outputs and the loop skips decode and backbone.
    precision = resolve_precision(cfg.precision, env.device)
    lap("model")
    inputs.build_cache(split.prefix, precision)
    lap("feature_cache")
    run = Run(
        cfg=cfg,
        env=env,
        run_dir=run_dir,
        resume_from=resume_from,
        index=index,
        num_classes=num_classes,
        inputs=inputs,
        model=model,
        source=source,
        split=split,
        sweep=sweep,
        optimizer=optimizer,
        scheduler=Schedule(optimizer, cfg.optim, total_steps),
        precision=precision,
        backend=_backend(cfg, env, precision, sweep),
        target=run_target(cfg, env, split, precision, spec=spec, total_steps=total_steps, sweep=sweep is not None),
        plan=plan,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        stop=stop,
        start_epoch=start_epoch,
        start_batch=start_batch,
        best={"metric": cfg.checkpoint.best_metric, "value": None, "epoch": None},
        loss=_loss(cfg, index, env.device),
        mix=batch_mix(cfg.augment, num_classes=num_classes, seed=cfg.run.seed),
    )
    assemble(run)
    run.ema = build_ema(cfg.optim, split.suffix, model)
    seed_rank_streams(cfg.run.seed, env.rank, env.world_size)
    run.meta = _meta(cfg, env, index, spec, source.head, num_classes)
    if state is not None and cfg.eval.tune_thresholds:  # a resumed run's saves keep them until it evaluates
        run.meta = thresholds.with_thresholds(run.meta, state["meta"].get("thresholds"))
    lap("assemble")  # backend, wrap, compile
    _open(run, state)
    opened.append(run.checkpointer)  # closed last, also when the run fails: its write in flight finishes
    lap("open")  # checkpointer, resumed state, run folder and logger
    _log_start(run, counts, phases or Phases())
    return run


def _place(cfg: FinetuneConfig, model: torch.nn.Module, source: _ModelSource, replayed: bool, device: torch.device):
    """The model on its device in the configured memory layout, then its split and optimizer (made after the move,
    so the optimizer's state lives on the device)."""
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    return _optimizer(cfg, model, source, replayed, device)


def _log_start(run: Run, counts: tuple[int, int], phases: Phases) -> None:
    """The run's first event: its shape, and where the set-up's seconds went (`phases`); teardown timing starts."""
    run.phases = phases
    run.phase_s["setup"] = phases.result()
    log.info("fastft: set-up %s", phases.describe())
    run.teardown = Phases()
    env = run.env
    run.logger.event(
        "start",
        world_size=env.world_size,
        trainable=counts[0],
        total=counts[1],
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        resumed_from=str(run.resume_from) if run.resume_from else None,
        setup=run.phase_s["setup"],
    )


def _open(run: Run, state: dict | None) -> None:
    """The checkpointer, the resumed state, then (only now: a refused run leaves the run folder as it was, or
    absent) the run folder and its logger."""
    cfg, env, run_dir = run.cfg, run.env, run.run_dir
    log.info(
        "fastft: precision %s (%s), compile %s, split %s, backend %s, world %d, device %s",
        run.precision.name,
        run.precision.reason,
        run.target,
        run.split.kind,
        run.backend.name,
        env.world_size,
        env.device,
    )
    run.checkpointer = Checkpointer(
        run_dir,
        env=env,
        model=run.model,
        backend=run.backend,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        meta=run.meta,
        sweep=run.sweep,
        ema=run.ema,
    )
    if state is not None:
        _restore(run, state)
    if env.is_main:
        resuming = run.resume_from is not None
        open_run_dir(cfg, run_dir, model=run.model, resuming=resuming, skipped=run.inputs.skipped)
    run.logger = RunLogger(run_dir, cfg.log, enabled=env.is_main)


def _loss(cfg: FinetuneConfig, index, device: torch.device) -> Loss | MultilabelLoss:
    """The training loss; `balanced` class weights come from the training labels (every rank's: the whole list)."""
    o = cfg.optim
    if cfg.data.task == "multilabel":  # BCEWithLogits; config validation refuses the single-label options
        return MultilabelLoss()
    labels = getattr(index.train, "labels", None) or [y for _, y in index.train]
    weights = class_weights(o.class_weights, labels, index.classes)
    return Loss(kind=o.loss, gamma=o.focal_gamma, label_smoothing=o.label_smoothing, weights=weights).to(device)


def _unfreeze_plan(cfg: FinetuneConfig, pos: tuple[int, int] | None) -> tuple[list, list]:
    """(unfreezes to come, unfreezes before the resume position): those are replayed, so the optimizer groups match
    the saved state."""
    plan = parse_unfreeze(cfg.optim.unfreeze)
    if plan and cfg.parallel.backend == "deepspeed":
        raise ConfigError("optim.unfreeze: gradual unfreezing is not supported with parallel.backend=deepspeed")
    replayed = [u for u in plan if _already_applied(u, pos)]
    return [u for u in plan if u not in replayed], replayed


def _optimizer(cfg: FinetuneConfig, model, source, replayed: list, device: torch.device):
    """(optimizer, split, sweep): the optimizer over the trainable parameters only. Groups carry weight decay and LR
    scales (layer-wise decay); gradual unfreezing appends groups later. A head sweep trains a bank of heads with
    groups of its own, and the bank becomes the split's suffix."""
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    kernel_on = None if cfg.parallel.backend == "deepspeed" else device  # DeepSpeed steps its own flat buffers
    kw = {"device": kernel_on, "scaled": cfg.precision.dtype == "fp16"}  # `auto` never resolves to fp16
    optimizer = build_optimizer(source.param_groups(model, trainable_names, cfg.optim), cfg.optim, **kw)
    for u in replayed:
        _apply_unfreeze(model, u, optimizer, cfg, source)
    split = source.split(model)
    sweep = Sweep.from_config(cfg, split, device)
    if sweep is not None:
        optimizer = build_optimizer(sweep.param_groups(cfg.optim), cfg.optim, **kw)
        split = sweep.split
    return optimizer, split, sweep


def _index(cfg: FinetuneConfig):
    """The data index (one class mapping for every loader) and the number of classes."""
    index = _data(cfg)[0](cfg)
    if not index.val:
        raise FastftError("no validation images: add a val folder or raise data.val_fraction")
    num_classes = cfg.model.num_classes or index.num_classes
    if num_classes != index.num_classes:
        raise ConfigError(f"model.num_classes: {num_classes} but the data has {index.num_classes} classes")
    return index, num_classes


def _data(cfg: FinetuneConfig) -> tuple[Callable, type]:
    """(index function, inputs class) of the run's data: text rows for a text encoder (model.source=hf), else
    images. The one place the run picks its modality."""
    if cfg.model.source == "hf":
        from fastft.text_inputs import TextInputs, text_index

        return text_index, TextInputs
    if cfg.data.task == "multilabel":  # label sets from a path,labels list (data/multilabel.py)
        return lambda c: index_multilabel(c.data, seed=c.run.seed), Inputs
    return lambda c: index_from_config(c.data, seed=c.run.seed), Inputs


def _read_resume(cfg: FinetuneConfig, env: penv.DistEnv, index, resume_from: Path | None) -> dict | None:
    """The checkpoint to resume from, read once, here, and refused before anything is built when it cannot
    continue this run: every changed key is refused (one line), or applied (and logged when it has a consequence)."""
    if resume_from is None:
        return None
    state = ckpt_io.load_checkpoint(resume_from)
    resume_rules.check_task(state, cfg.data.task, path=resume_from)  # before the classes: a task change names itself
    if state["meta"]["classes"] != index.classes:
        raise ConfigError(f"{resume_from}: trained on classes {state['meta']['classes'][:5]}..., data has others")
    resume_rules.reconcile(state, cfg, world_size=env.world_size, path=resume_from, main=env.is_main)
    return state


def _lengths(cfg: FinetuneConfig, env: penv.DistEnv, batches: int, images: int) -> tuple[int, int, int]:
    """(epochs, optimizer steps per epoch, total steps) from the loader's length and optim.epochs / max_steps."""
    accum = cfg.optim.grad_accum
    steps_per_epoch = batches // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} x grad_accum {accum} x {env.world_size} ranks "
            f"is more than the {images} training images"
        )
    epochs = cfg.optim.epochs
    total_steps = epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total_steps = cfg.optim.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    return epochs, steps_per_epoch, total_steps


def _backend(cfg: FinetuneConfig, env: penv.DistEnv, precision, sweep: Sweep | None) -> Backend:
    return build_backend(
        cfg.parallel.backend,
        env=env,
        precision=precision,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        grad_accum=cfg.optim.grad_accum,
        clip_sets=sweep.clip_sets() if sweep is not None else None,
        sync_bn=cfg.parallel.sync_bn,
        deepspeed=DeepSpeedOptions.from_config(cfg) if cfg.parallel.backend == "deepspeed" else None,
    )


def _meta(cfg: FinetuneConfig, env: penv.DistEnv, index, spec, head: str, num_classes: int) -> dict:
    """What a checkpoint or export needs to rebuild the model and its preprocessing."""
    return {
        "format": ckpt_io.FORMAT_VERSION,
        "source": cfg.model.source,
        "model_name": cfg.model.name,
        "num_classes": num_classes,
        "classes": index.classes,
        "task": cfg.data.task,  # multilabel: sigmoid per class, eval.threshold (fastft predict / eval read these)
        "threshold": cfg.eval.threshold,
        "transform": spec.to_dict(),
        "head": head,
        "head_hidden": cfg.model.head_hidden,
        "head_dropout": cfg.model.head_dropout,
        "config": dataclasses.asdict(cfg),
        "world_size": env.world_size,
    }


def _restore(run: Run, state: dict) -> None:
    """Resume: model, optimizer, schedule, scaler, RNG (the checkpointer), then the position inside the epoch."""
    run.checkpointer.restore(state, run.resume_from)
    run.step = state["step"]
    saved_stats = state.get("epoch_stats") or [None]
    run.resumed_stats = saved_stats[min(run.env.rank, len(saved_stats) - 1)] if run.start_batch else None
    run.best = state["best"]
    if not run.start_batch:  # at an epoch boundary: a run that stopped early there stays stopped
        run.early_stop = _early_stop(run, run.start_epoch)
    log.info(
        "fastft: resumed from %s at epoch %d, batch %d, step %d",
        run.resume_from,
        run.start_epoch,
        run.start_batch,
        run.step,
    )


def assemble(run: Run) -> None:
    """(Re)build what depends on the split: compiled suffix, wrapped module, and the prefix the inputs go through."""
    cfg, split = run.cfg, run.split
    run.backend.prepare(split.suffix, run.model)  # before compile: the compiled graph must see what it changes
    compiled = run.target in ("head", "all")
    run.suffix = apply_compile(split.suffix, cfg.compile) if compiled else split.suffix
    run.inputs.use_prefix(split.prefix, compile_cfg=cfg.compile if run.target == "all" else None)
    run.train_module = run.backend.wrap(run.suffix, run.optimizer)


def unfreeze_due(run: Run, epoch: int) -> None:
    """Unfreezes due at this epoch move the prefix/suffix cut: drop the feature cache (the prefix changed),
    re-split, recompile and re-wrap; the optimizer gains groups and keeps the old groups' state."""
    due = [u for u in run.plan if u.epoch == epoch + 1]
    if not due:
        return
    for u in due:
        newly = _apply_unfreeze(run.model, u, run.optimizer, run.cfg, run.source)
        log.info("fastft: epoch %d: unfroze %s (%s tensors, lr x%g)", epoch + 1, u.module, len(newly), u.lr_factor)
        run.logger.event("unfreeze", epoch=epoch + 1, module=u.module, tensors=len(newly), lr_factor=u.lr_factor)
    run.plan = [u for u in run.plan if u.epoch != epoch + 1]
    run.scheduler.apply()
    run.split = run.source.split(run.model)
    run.inputs.invalidate()
    assemble(run)


def train_one_epoch(run: Run, epoch: int) -> tuple[float, float]:
    """One epoch of optimizer steps from run.start_batch. Returns (mean train loss, img/s over all ranks)."""
    cfg, env, device, inputs = run.cfg, run.env, run.device, run.inputs
    accum = cfg.optim.grad_accum
    if inputs.prefix is not None:
        inputs.prefix.eval()  # frozen: running statistics and dropout never change
    run.split.suffix.train()
    inputs.train.set_epoch(epoch, run.start_batch)
    bar = _progress(cfg, env, len(inputs.train) - run.start_batch, f"epoch {epoch + 1}/{run.epochs}")
    t0 = time.perf_counter()
    stats = EpochStats(torch.zeros((), device=device))
    if run.resumed_stats is not None:  # continuing a partial epoch: its first batches count in the epoch mean
        stats.loss_sum += run.resumed_stats["loss_sum"]
        stats.loss_n, stats.seen = run.resumed_stats["loss_n"], run.resumed_stats["seen"]
        run.resumed_stats = None
    seen0 = stats.seen
    timer = StepTimer(device, enabled=cfg.log.step_timing)
    usable = run.steps_per_epoch * accum  # trailing micro-batches that cannot fill a step are dropped
    timer.start()
    for batch_idx, (images, labels) in enumerate(inputs.train, start=run.start_batch):
        if batch_idx >= usable or run.step >= run.total_steps:
            break
        boundary = (batch_idx + 1) % accum == 0
        loss = train_step(run, images, labels, boundary=boundary, timer=timer, epoch=epoch, batch=batch_idx)
        stats.loss_sum += loss
        stats.loss_n += 1
        stats.seen += labels.shape[0]
        if bar is not None:
            bar.update(1)
        run.backend.step(boundary)
        timer.mark("optimizer")
        if boundary:
            after_step(run, epoch, batch_idx, stats, bar=bar, t0=t0)
            timer.start()
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    img_s = (stats.seen - seen0) * env.world_size / elapsed if elapsed > 0 else 0.0
    run.throughput[f"epoch{epoch}"] = img_s
    run.timings[f"epoch{epoch}"] = {**timer.result(), "wall": elapsed, "images": (stats.seen - seen0) * env.world_size}
    if cfg.log.step_timing:
        _log_timing(run.logger, epoch, run.timings[f"epoch{epoch}"])
    train_loss = stats.loss_sum.item() / max(stats.loss_n, 1)
    if not math.isfinite(train_loss):
        refuse_nonfinite(train_loss, epoch, run.step, run.run_dir)
    run.start_batch = 0
    return train_loss, img_s


def train_step(
    run: Run, images, labels, *, boundary: bool, timer: StepTimer, epoch: int, batch: int = 0
) -> torch.Tensor:
    """One micro-batch (`batch`: its index in the epoch): inputs -> (MixUp/CutMix) -> frozen part -> trainable part ->
    loss -> backward. Returns the detached loss."""
    inputs, precision, backend = run.inputs, run.precision, run.backend
    images, labels = inputs.to_device(images, labels, run.device)
    if run.mix is not None:  # labels become soft targets (B, K)
        images, labels = run.mix(images, labels, epoch=epoch, batch=batch)
    timer.mark("data")
    feats = inputs.features(images, precision, backend.input_dtype)
    timer.mark("frozen")
    with backend.no_sync() if not boundary else contextlib.nullcontext():
        with precision.autocast():
            logits = run.train_module(feats)
        if run.sweep is None:
            loss = run.loss(logits, labels)
        else:
            loss = run.sweep.loss(logits, labels, run.loss)
        if _eager_checks(run.device) and not torch.isfinite(loss):  # free on CPU; on GPU checked at log cadence
            refuse_nonfinite(loss.detach(), epoch, run.step + 1, run.run_dir)
        backend.backward(loss)
    timer.mark("trainable")
    return loss.detach()


def after_step(run: Run, epoch: int, batch_idx: int, stats: EpochStats, *, bar, t0: float) -> None:
    """At an optimizer step: checks, schedule, logging at its cadence, step saves, and a stop request."""
    cfg, env, backend = run.cfg, run.env, run.backend
    if _eager_checks(run.device) and not backend.grads_finite():  # on GPU: at log cadence and in every save
        refuse_nonfinite(float("nan"), epoch, run.step + 1, run.run_dir, what="gradient norm")
    run.scheduler.step()
    run.step += 1
    step = run.step
    if run.ema is not None:
        run.ema.step(step)
    saving = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
    if step % cfg.log.every_steps == 0 or saving:
        mean_loss = stats.loss_sum.item() / stats.loss_n  # one host sync per log interval
        if not math.isfinite(mean_loss):  # before any save: the last good checkpoint is never overwritten
            refuse_nonfinite(mean_loss, epoch, step, run.run_dir)
        if not backend.grads_finite():
            refuse_nonfinite(float("nan"), epoch, step, run.run_dir, what="gradient norm")
        if env.is_main:
            lr = run.optimizer.param_groups[0]["lr"]
            run.logger.event("step", epoch=epoch, step=step, loss=mean_loss, lr=lr)
            run.logger.scalars(step, {"train/loss": mean_loss, "train/lr": lr})
            if bar is not None:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{stats.seen * env.world_size / elapsed:.0f}")
    if saving:
        _save(run, "last.pt", epoch, batch_idx + 1, stats)
    if run.stop.requested():  # SIGTERM / SIGUSR1: save this step boundary, then end (resume=auto continues)
        if not saving:
            _save(run, "last.pt", epoch, batch_idx + 1, stats)
        run.checkpointer.wait()  # on disk before the message says so (a failed write is the error instead)
        _stopped(run.stop.received, epoch, step, run.run_dir)


def _save(run: Run, name: str, epoch: int, batch: int, stats: EpochStats | None) -> None:
    sync_buffers(run.split.suffix)  # the ranks' BatchNorm statistics drift apart during training forwards
    saved = stats.saved() if stats is not None else None
    run.checkpointer.save(name, epoch=epoch, batch=batch, step=run.step, best=run.best, stats=saved)


def end_of_epoch(run: Run, epoch: int, train_loss: float, img_s: float) -> None:
    """Evaluate when due, keep the best, log, and write best.pt / last.pt."""
    cfg = run.cfg
    last_epoch = epoch + 1 == run.epochs or run.step >= run.total_steps
    run.teardown.restart()  # kept when this is the last epoch: its evaluation and saves are the run's teardown
    run.logger.scalars(epoch, {"train/epoch_loss": train_loss, "train/img_per_s": img_s})
    better = False
    if (epoch + 1) % cfg.run.eval_every_epochs == 0 or last_epoch:
        run.report = evaluate(run)
        better = _track_best(run, epoch, train_loss, img_s)
        run.early_stop = _early_stop(run, epoch + 1)
        if run.early_stop and not last_epoch:
            last_epoch = True
            log.info("fastft: early stop after epoch %d: %s", epoch + 1, run.early_stop["reason"])
            run.logger.event("early_stop", step=run.step, **run.early_stop)
    if last_epoch:
        run.teardown.lap("evaluation")
    want_last = bool(cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0) or last_epoch
    if better or want_last:
        sync_buffers(run.split.suffix)
    run.checkpointer.save_epoch_end(epoch + 1, better=better, want_last=want_last, step=run.step, best=run.best)
    if last_epoch:
        run.teardown.lap("checkpoints")


def _track_best(run: Run, epoch: int, train_loss: float, img_s: float) -> bool:
    """Compare the report's best_metric with the best so far, log the evaluation; True when it improved."""
    cfg, report = run.cfg, run.report
    key = cfg.checkpoint.best_metric
    if key not in report:
        raise ConfigError(
            f"checkpoint.best_metric: {key!r} is not a report key "
            f"({', '.join(k for k, v in report.items() if isinstance(v, float))})"
        )
    value = report[key]
    best = run.best["value"]
    better = best is None or (value > best if cfg.checkpoint.best_mode == "max" else value < best)
    prev = run.best
    if better:
        run.best = {"metric": key, "value": value, "epoch": epoch + 1}
    c = cfg.checkpoint
    run.best = {**run.best, **early_stop.mark(prev, value, epoch + 1, mode=c.best_mode, min_delta=c.min_delta)}
    scalars = {k: v for k, v in report.items() if isinstance(v, float)}
    run.logger.event("eval", epoch=epoch + 1, step=run.step, train_loss=train_loss, img_per_s=img_s, **scalars)
    run.logger.scalars(epoch + 1, scalars, prefix="val/")
    log.info(
        "fastft: epoch %d/%d  train loss %.4f  %s %.4f  %s %.4f  %.1f img/s",
        epoch + 1,
        run.epochs,
        train_loss,
        key,
        value,
        *(("top1", report["top1"]) if "top1" in report else ("subset_accuracy", report["subset_accuracy"])),
        img_s,
    )
    return better


def _early_stop(run: Run, epoch: int) -> dict | None:
    """{"epoch", "reason"} when patience has run out after `epoch` (1-based), else None."""
    c = run.cfg.checkpoint
    every = run.cfg.run.eval_every_epochs
    why = early_stop.reason(run.best, epoch, patience=c.patience, min_delta=c.min_delta, eval_every=every)
    return {"epoch": epoch, "reason": why} if why else None


def evaluate(run: Run) -> dict:
    """The exact evaluation of the current model on the val loader (the best head's report when sweeping); with an
    EMA, its model's scalars are added under `ema/` keys, evaluated the same way."""
    sync_buffers(run.split.suffix)  # every rank evaluates the model that is saved (rank 0's buffers)
    run.split.suffix.eval()
    if run.ema is not None:  # both models in one pass over the images: the frozen prefix runs once
        report = run.ema.merge(*_evaluate_suffix(run, run.ema.paired(run.suffix), heads=2))
    else:
        out = _evaluate_suffix(run, run.suffix, heads=run.sweep.heads if run.sweep is not None else 0)
        report = out if run.sweep is None else run.sweep.select(out)
    # eval.tune_thresholds: those of the model a checkpoint gives (the EMA's when kept) go with the next saves
    kept = thresholds.of_report(report, ema=run.ema is not None and picks_ema(run.cfg.checkpoint.best_metric))
    run.meta = run.checkpointer.meta = thresholds.with_thresholds(run.meta, kept)
    return report


def _evaluate_suffix(run: Run, suffix: Callable, *, heads: int) -> dict | list[dict]:
    forward = run.inputs.eval_forward(suffix, run.backend.input_dtype)
    return run_evaluation(
        forward,
        run.inputs.val,
        num_classes=run.num_classes,
        device=run.device,
        precision=run.precision,
        channels_last=run.cfg.model.channels_last and run.inputs.prefix is not None,
        pad_to=run.inputs.eval_batch_size if run.target != "none" else 0,
        classes=run.index.classes,
        heads=heads,
        task=run.cfg.data.task,
        threshold=run.cfg.eval.threshold,
        tune_thresholds=run.cfg.eval.tune_thresholds,
    )


def finish(run: Run) -> RunResult:
    """Outputs: report, exports (full model and head alone) on rank 0; the run's result on every rank."""
    cfg, env, run_dir = run.cfg, run.env, run.run_dir
    paths: dict[str, Path] = {"run_dir": run_dir, "last": run_dir / "last.pt", "best": run_dir / "best.pt"}
    lap = run.teardown.lap
    if not run.report:
        run.report = evaluate(run)
        lap("evaluation")
    report = run.report
    if run.early_stop:
        report["early_stop"] = run.early_stop
    final_state = run.checkpointer.model_state()  # a collective: every rank
    if run.ema is not None and picks_ema(cfg.checkpoint.best_metric):
        final_state = run.ema.model_state(final_state)  # the EMA is what the run keeps: its weights are exported
    if env.is_main:
        sweep_text = report.pop("sweep_table", None)
        if cfg.data.loader == "synthetic":
            report["synthetic_data"] = True  # one random batch: the metrics say nothing about the data folder
        lap("final_state")
        paths.update(
            write_report(report, run_dir, events=run_dir / "events.jsonl", best_metric=cfg.checkpoint.best_metric)
        )
        lap("report")  # metrics.json, confusion matrix, report.html
        paths.update(_export(run, final_state))
        lap("exports")
        run.checkpointer.wait()  # the last checkpoint write (in the background since the last save) is on disk
        lap("checkpoint_write")
        _log_tensorboard(run)
        lap("tensorboard")
        print(format_table(report))
        if sweep_text:
            print(f"head sweep ({run.sweep.heads} heads, kept by {cfg.checkpoint.best_metric}):\n{sweep_text}")
        print(f"run folder: {run_dir}")
    run.phase_s["teardown"] = run.teardown.result()
    log.info("fastft: teardown %s", run.teardown.describe())
    if env.is_main:
        _log_end(run)  # the last event: the run's end, with the teardown's seconds
    run.logger.close()
    penv.barrier(env)
    return RunResult(
        run_dir,
        report,
        run.best,
        paths,
        run.throughput,
        run.step,
        run.timings,
        skipped_steps=run.backend.skipped_steps,
        feature_cache=run.inputs.cache_info,
        phases=run.phase_s,
    )


def _export(run: Run, final_state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """model.safetensors and head.safetensors (+ their JSON metadata)."""
    model, run_dir, meta = run.model, run.run_dir, run.meta
    head = model.get_submodule(run.source.head)
    head_prefix = f"{run.source.head}."
    head_state = {k.removeprefix(head_prefix): v for k, v in final_state.items() if k.startswith(head_prefix)}
    if run.ema is not None:  # which weights the files hold: the EMA's or the raw ones (finish)
        meta = {**meta, "ema_weights": picks_ema(run.cfg.checkpoint.best_metric)}
    model_meta, head_meta = {**meta, "part": "model"}, {**meta, "part": "head"}
    model_path = ckpt_io.export_safetensors(model, run_dir / "model.safetensors", model_meta, final_state)
    head_path = ckpt_io.export_safetensors(head, run_dir / "head.safetensors", head_meta, head_state)
    return {"model_export": model_path, "head_export": head_path}


def _log_tensorboard(run: Run) -> None:
    """The confusion matrix figure and the run's hyperparameters with its final metrics."""
    from fastft.report import confusion_figure

    cfg, logger, report = run.cfg, run.logger, run.report
    if logger.tb is None:  # TensorBoard off (or not the main rank): no figure to draw
        return
    if "confusion_matrix" in report:  # not in a multilabel report
        logger.figure("val/confusion_matrix", confusion_figure(report), run.epochs)
    logger.hparams(
        {
            "model": cfg.model.name,
            "freeze": str(cfg.model.freeze),
            "lr": cfg.optim.lr,
            "optim": cfg.optim.name,
            "batch_size": cfg.data.batch_size * run.env.world_size,
            "precision": run.precision.name,
        },
        {k: report[k] for k in ("top1", "subset_accuracy", "f1_macro", "loss") if report.get(k) is not None},
    )


def _log_end(run: Run) -> None:
    skipped = run.backend.skipped_steps
    if skipped:
        log.warning("fastft: the fp16 loss scaler skipped %d of %d steps (overflow)", skipped, run.step)
    run.logger.event(
        "end",
        step=run.step,
        best=run.best,
        throughput=run.throughput,
        skipped_steps=skipped,
        teardown=run.phase_s["teardown"],
    )


def _log_timing(logger: RunLogger, epoch: int, t: dict) -> None:
    """log.step_timing: the epoch's per-segment seconds on the console, in events.jsonl and TensorBoard."""
    segs = {k: v for k, v in t.items() if k not in ("wall", "images")}
    log.info(
        "fastft: epoch %d step time: %s (wall %.2fs)",
        epoch + 1,
        ", ".join(f"{k} {v:.3f}s" for k, v in segs.items()),
        t["wall"],
    )
    logger.event("timing", epoch=epoch + 1, **t)
    logger.scalars(epoch + 1, segs, prefix="time/")


def _already_applied(u: UnfreezeStep, pos: tuple[int, int] | None) -> bool:
    """An unfreeze at epoch E (1-based) ran before batch 0 of 0-based epoch E-1."""
    if pos is None:
        return False
    epoch, batch = pos
    return u.epoch - 1 < epoch or (u.epoch - 1 == epoch and batch > 0)


def _apply_unfreeze(model, u: UnfreezeStep, optimizer, cfg: FinetuneConfig, source: _ModelSource) -> list[str]:
    newly = unfreeze_module(model, u.module)
    if newly:
        for g in source.param_groups(model, newly, cfg.optim, lr_factor=u.lr_factor, tag=f"{u.module}:"):
            optimizer.add_param_group(g)
    return newly


def _stopped(signal_name: str | None, epoch: int, step: int, run_dir: Path):
    raise FastftError(
        f"stopped by {signal_name} at epoch {epoch + 1}, step {step}: the position is saved in {run_dir / 'last.pt'}; "
        "run the same command with --resume=auto to continue"
    )


def _eager_checks(device: torch.device) -> bool:
    """Check the loss and gradients at every step? Free on CPU; on a GPU each check is a host sync, so there they run
    at the log cadence and before every save."""
    return device.type == "cpu"


def _progress(cfg: FinetuneConfig, env: penv.DistEnv, total: int, desc: str):
    if not (cfg.log.progress and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
