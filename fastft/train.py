"""The fine-tuning run: one loop, read top to bottom.

Order of construction (each a verb from its own module):
    data index -> resume checkpoint read and checked -> loaders (every file checked; the first epoch's loading, or
    the feature cache's decode, starts here and overlaps the rest of the set-up) -> build model (weights, new head)
    -> freeze -> device + channels_last -> split prefix/suffix -> optimizer + schedule -> precision -> feature cache
    -> compile suffix -> backend.wrap(suffix) -> resume state
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastft import checkpoint as ckpt_io
from fastft import outputs
from fastft import resume as resume_rules
from fastft.compile import apply_compile, resolve_target
from fastft.config import FinetuneConfig, UnfreezeStep, check_device, parse_unfreeze, to_toml
from fastft.data.folder import index_from_config
from fastft.data.loaders import build_loader
from fastft.data.transforms import spec_from_weights
from fastft.errors import ConfigError, FastftError
from fastft.evaluation import run_evaluation
from fastft.logging import RunLogger
from fastft.model import Split, build_model, freeze, preset_weights, split_model
from fastft.optim import Schedule, build_optimizer, param_groups
from fastft.parallel import env as penv
from fastft.parallel.backend import all_finite, build_backend, sync_buffers
from fastft.parallel.deepspeed import DeepSpeedOptions
from fastft.precision import resolve_precision
from fastft.preflight import check_before_training
from fastft.report import atomic_write_text, format_table, write_report
from fastft.sweep import HeadBank, bank_param_groups, check_sweep, sweep_grid, sweep_table
from fastft.timing import StepTimer
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


def prepare_run_dir(cfg: FinetuneConfig, env: penv.DistEnv) -> tuple[Path, Path | None]:
    """Pick the run folder and the checkpoint to resume from; fail before any training if it is unusable."""
    resume = cfg.checkpoint.resume
    if resume and resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(f"checkpoint.resume: no such checkpoint {path}")
        return path.parent, path
    if cfg.run.name:
        name = cfg.run.name
    elif resume == "auto":  # the same command finds its folder again (a requeued or restarted job)
        name = default_run_name(cfg)
    else:
        name = f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name = penv.broadcast_object(env, name)  # ranks may disagree on the clock
    run_dir = Path(cfg.run.out_dir) / name
    if resume == "auto" and (run_dir / "last.pt").is_file():
        return run_dir, run_dir / "last.pt"
    if env.is_main:  # checks only: open_run_dir makes (or clears, with --overwrite) the folder after every check
        if _restarting(cfg, run_dir):
            log.info("fastft: %s holds no checkpoint yet (stopped before its first save): starting", run_dir)
        overwrite = cfg.run.overwrite or _restarting(cfg, run_dir)
        outputs.check_run_dir(run_dir, overwrite=overwrite, inputs=outputs.run_inputs(cfg))
        outputs.check_run_not_in_data(run_dir, cfg.data)
    return run_dir, None


# Keys that do not change what is trained: left out of the default run name, so a restarted command finds its run.
_NAME_EXCLUDES = {
    "run": ("name", "out_dir", "overwrite", "device"),
    "checkpoint": ("resume", "every_steps", "every_epochs"),
    "data": ("workers",),
    "parallel": ("timeout_s",),
    "log": None,  # the whole section
}


def default_run_name(cfg: FinetuneConfig) -> str:
    """`<model>-<hash>`: a short hash of the resolved config without the keys in _NAME_EXCLUDES."""
    import hashlib
    import json

    resolved = dataclasses.asdict(cfg)
    for section, keys in _NAME_EXCLUDES.items():
        if keys is None:
            resolved.pop(section, None)
        for key in keys or ():
            resolved.get(section, {}).pop(key, None)
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-{digest}"


def _restarting(cfg: FinetuneConfig, run_dir: Path) -> bool:
    """`resume=auto` without a run name, and the derived folder holds only fastft's outputs: the same command stopped
    before its first save, so it starts again there (a folder holding anything else is still refused)."""
    return cfg.checkpoint.resume == "auto" and not cfg.run.name and run_dir.is_dir() and outputs.only_outputs(run_dir)


# --------------------------------------------------------------------------------------------------------------------
# The run


def check_free_space(run_dir: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the run folder cannot hold a checkpoint (model + optimizer state, written via a temp
    file next to the previous one) and the exports: better now than after an hour of training."""
    import shutil

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = 3 * (params + buffers + 2 * trainable) + (params + buffers)
    free = shutil.disk_usage(outputs.existing_ancestor(run_dir)).free  # the folder is made after the checks
    if free < need:
        raise ConfigError(
            f"run folder {run_dir}: not enough free space ({free / 2**20:.0f} MiB free, about "
            f"{need / 2**20:.0f} MiB needed for checkpoints and exports)"
        )


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
        return _finetune(cfg, env, opened)
    finally:
        for source in opened:
            source.close()
        torch.use_deterministic_algorithms(prev_det)
        penv.shutdown(env)


def _finetune(cfg: FinetuneConfig, env: penv.DistEnv, opened: list) -> RunResult:
    device = env.device
    stop = penv.StopSignal(env)  # closed with the loaders: the caller's signal handlers come back
    opened.append(stop)
    seed_everything(cfg.run.seed, env.rank)

    # 1. Data index (one class mapping for every loader) and the run folder.
    index = index_from_config(cfg.data, seed=cfg.run.seed)
    if not index.val:
        raise FastftError("no validation images: add a val folder or raise data.val_fraction")
    num_classes = cfg.model.num_classes or index.num_classes
    if num_classes != index.num_classes:
        raise ConfigError(f"model.num_classes: {num_classes} but the data has {index.num_classes} classes")
    run_dir, resume_from = prepare_run_dir(cfg, env)
    # The checkpoint to resume from is read once, here, and refused before anything is built when it cannot
    # continue this run.
    state = None
    if resume_from is not None:
        state = ckpt_io.load_checkpoint(resume_from)
        if state["meta"]["classes"] != index.classes:
            raise ConfigError(f"{resume_from}: trained on classes {state['meta']['classes'][:5]}..., data has others")
        # every changed key: refused (one line), or applied (and logged when it has a consequence)
        resume_rules.reconcile(state, cfg, world_size=env.world_size, path=resume_from, main=env.is_main)
    resume_pos = (state["epoch"], state["batch"]) if state is not None else None
    plan = parse_unfreeze(cfg.optim.unfreeze)
    if plan and cfg.parallel.backend == "deepspeed":
        raise ConfigError("optim.unfreeze: gradual unfreezing is not supported with parallel.backend=deepspeed")
    # Unfreezes before the resume position are replayed (so the optimizer groups match the saved state).
    replayed = [u for u in plan if _already_applied(u, resume_pos)]
    plan = [u for u in plan if u not in replayed]
    cached = cfg.features.cache != "off" and not replayed  # after an unfreeze the original run went uncached too

    # 2. Loaders, sharded by rank; every file is checked here, before the model is built. Without a feature cache
    #    the first epoch's loading starts now (workers spawn and decode ahead) and overlaps building the model.
    spec = spec_from_weights(preset_weights(cfg.model.name, cfg.model.weights), cfg.data.image_size)
    train_loader = build_loader(index.train, spec, cfg.data, train=True, seed=cfg.run.seed, env=env)
    eval_bs = cfg.data.eval_batch_size or cfg.data.batch_size
    val_loader = build_loader(index.val, spec, cfg.data, train=False, seed=cfg.run.seed, env=env, batch_size=eval_bs)
    opened += [train_loader, val_loader]
    skipped = sorted(set(getattr(train_loader, "skipped", [])) | set(getattr(val_loader, "skipped", [])))
    if skipped:  # the feature cache reads the index: keep it to the files the loaders use
        index.train = [s for s in index.train if s[0] not in set(skipped)]
        index.val = [s for s in index.val if s[0] not in set(skipped)]
    accum = cfg.optim.grad_accum
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} x grad_accum {accum} x {env.world_size} ranks "
            f"is more than the {len(index.train)} training images"
        )
    epochs = cfg.optim.epochs
    total_steps = epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total_steps = cfg.optim.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    start_epoch, start_batch = resume_pos or (0, 0)
    sources = None
    if cached:
        sources = _feature_sources(cfg, index, spec, env, eval_bs)
        opened += sources
    elif start_epoch < epochs and (state["step"] if state is not None else 0) < total_steps:
        train_loader.start(start_epoch, start_batch)  # (a finished run that is resumed only evaluates)

    # 3. Model: weights -> new head -> freeze -> device/layout -> frozen prefix + trainable suffix.
    model = build_model(cfg.model, num_classes, image_size=spec.crop_size)
    trainable, total = freeze(model, cfg.model.freeze)
    log.info(
        "fastft: %s, freeze=%s: %s of %s parameters train (%.2f%%)",
        cfg.model.name,
        cfg.model.freeze,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    check_before_training(
        cfg,
        model=model,
        num_classes=num_classes,
        plan=plan,
        epochs=epochs,
        total_steps=total_steps,
        world_size=env.world_size,
        main=env.is_main,
    )
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)

    # 4. Optimizer over the trainable parameters only. Groups carry weight decay and LR scales (layer-wise decay);
    #    gradual unfreezing appends groups later.
    head = model.fastft_head
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(param_groups(model, trainable_names, cfg.optim, head=head), cfg.optim)
    for u in replayed:
        _apply_unfreeze(model, u, optimizer, cfg)
    split = split_model(model)
    grid = sweep_grid(cfg)  # [(lr, wd)] per head when sweeping: the suffix becomes a bank of heads
    bank = None
    if grid:
        check_sweep(cfg, split.kind)
        bank = HeadBank(split.suffix, len(grid)).to(device)
        optimizer = build_optimizer(bank_param_groups(bank, grid, cfg.optim), cfg.optim)
        split = Split(model, split.prefix, bank, "head")

    scheduler = Schedule(optimizer, cfg.optim, total_steps)

    # 5. Precision, then (optionally) the frozen-feature cache: from here on, a cached run's "images" are the
    #    prefix outputs and the loop skips decode and backbone.
    precision = resolve_precision(cfg.precision, device)
    image_loaders = (train_loader, val_loader)
    feature_cache: dict = {}
    if cached:
        train_loader, val_loader, feature_cache = _cached_loaders(cfg, split, sources, env, precision, eval_bs)
    target = resolve_target(cfg.compile, device)
    backend = build_backend(
        cfg.parallel.backend,
        env=env,
        precision=precision,
        clip_grad_norm=cfg.optim.clip_grad_norm,
        grad_accum=accum,
        # a sweep clips each head on its own: heads must not influence each other
        clip_sets=[list(h.parameters()) for h in bank.heads] if bank is not None else None,
        sync_bn=cfg.parallel.sync_bn,
        deepspeed=DeepSpeedOptions.from_config(cfg) if cfg.parallel.backend == "deepspeed" else None,
    )

    def assemble() -> None:
        """(Re)build what depends on the split: compiled suffix, wrapped module, and the prefix to run."""
        nonlocal suffix, prefix, train_module
        backend.prepare(split.suffix, model)  # before compile: the compiled graph must see what it changes
        suffix = apply_compile(split.suffix, cfg.compile) if target in ("head", "all") else split.suffix
        cached = cfg.features.cache != "off" and train_loader is not image_loaders[0]
        prefix = None if cached else split.prefix
        if prefix is not None and target == "all":
            prefix = apply_compile(prefix, cfg.compile)
        train_module = backend.wrap(suffix, optimizer)

    suffix = prefix = train_module = None
    assemble()
    seed_rank_streams(cfg.run.seed, env.rank, env.world_size)
    suffix_dtype = backend.input_dtype  # None: the suffix takes the prefix's output as it is
    log.info(
        "fastft: precision %s (%s), compile %s, split %s, backend %s, world %d, device %s",
        precision.name,
        precision.reason,
        target,
        split.kind,
        backend.name,
        env.world_size,
        device,
    )

    # 6. Resume: model, optimizer, schedule, scaler, RNG, and the position inside the epoch.
    resumed_stats = None
    step = 0
    best: dict = {"metric": cfg.checkpoint.best_metric, "value": None, "epoch": None}
    meta = {
        "format": ckpt_io.FORMAT_VERSION,
        "model_name": cfg.model.name,
        "num_classes": num_classes,
        "classes": index.classes,
        "transform": spec.to_dict(),
        "head": model.fastft_head,
        "head_hidden": cfg.model.head_hidden,
        "head_dropout": cfg.model.head_dropout,
        "config": dataclasses.asdict(cfg),
        "world_size": env.world_size,
    }
    if state is not None:
        ckpt_io.load_model_state(model, state["model"], resume_from)
        if bank is not None:
            ckpt_io.load_model_state(bank, state["sweep_bank"], resume_from)
        backend.load_optimizer_state(state["optimizer"], resume_from)
        scheduler.load_state_dict(state["scheduler"])
        backend.load_state_dict(state["backend"])
        ckpt_io.set_rng_state(state["rng"][min(env.rank, len(state["rng"]) - 1)])
        step = state["step"]
        saved_stats = state.get("epoch_stats") or [None]
        resumed_stats = saved_stats[min(env.rank, len(saved_stats) - 1)] if start_batch else None
        best = state["best"]
        state = None  # the model and optimizer hold their copies now
        log.info("fastft: resumed from %s at epoch %d, batch %d, step %d", resume_from, start_epoch, start_batch, step)

    if env.is_main:  # only now: a refused run leaves the run folder as it was (or absent)
        check_free_space(run_dir, model)
        fresh = resume_from is None
        outputs.open_run_dir(run_dir, overwrite=(cfg.run.overwrite or _restarting(cfg, run_dir)) and fresh)
        if skipped:
            atomic_write_text(run_dir / "skipped_files.txt", "".join(f"{p}\n" for p in skipped))
            log.info("fastft: skipped %d unreadable files (listed in %s)", len(skipped), run_dir / "skipped_files.txt")
        for tmp in run_dir.glob(".*.tmp*"):  # left by a process killed mid-save
            tmp.unlink(missing_ok=True)
        atomic_write_text(run_dir / "config.toml", to_toml(cfg))  # replaced whole, also on resume

    def model_state() -> dict[str, torch.Tensor]:
        """The model's state dict with full-precision weights: where the backend trains a bf16/fp16 copy (DeepSpeed),
        its fp32 masters replace the copy and the rest is cast back to fp32. Collective: every rank calls it."""
        masters = backend.master_weights()
        state = model.state_dict()
        if masters:
            names = {id(p): n for n, p in model.named_parameters()}
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            state.update({names[i]: t for i, t in masters.items() if i in names})
        return state

    whole = [False]  # the file last written holds the whole state (no optimizer state kept beside it)

    def save(name: str, epoch: int, batch: int) -> None:
        # Every rank contributes its RNG state (gathered); rank 0 writes.
        sync_buffers(split.suffix)  # the ranks' BatchNorm statistics drift apart during training forwards
        rngs = [ckpt_io.rng_state()]
        stats = [{"loss_sum": float(loss_sum), "loss_n": loss_n, "seen": seen} if batch else None]
        if env.distributed:
            gathered: list = [None] * env.world_size
            torch.distributed.all_gather_object(gathered, (rngs[0], stats[0]))
            rngs, stats = [g[0] for g in gathered], [g[1] for g in gathered]
        # Nothing non-finite is ever written, whatever the device's check cadence in the loop: the gradient flag and
        # the weights themselves are checked before the first byte (the same verdict on every rank).
        shown = epoch - 1 if batch == 0 else epoch  # the epoch the state comes from (0-based)
        if not backend.grads_finite():
            _nonfinite(float("nan"), shown, step, run_dir, what="gradient norm")
        weights = model_state()
        if not all_finite(weights):
            _nonfinite(float("nan"), shown, step, run_dir, what="a weight")
        opt_state = backend.save_optimizer_state(run_dir, name.removesuffix(".pt"))  # collective where sharded
        whole[0] = opt_state is not None
        if env.is_main:
            extra = {"sweep_bank": bank.state_dict()} if bank is not None else {}
            ckpt_io.atomic_save(
                {
                    **extra,
                    "model": weights,
                    "optimizer": opt_state,
                    "scheduler": scheduler.state_dict(),
                    "backend": backend.state_dict(),
                    "rng": rngs,
                    "epoch_stats": stats,  # the partial epoch's loss sums, so its logged mean stays right
                    "epoch": epoch,
                    "batch": batch,
                    "step": step,
                    "best": best,
                    "meta": meta,
                },
                run_dir / name,
            )

    logger = RunLogger(run_dir, cfg.log, enabled=env.is_main)
    logger.event(
        "start",
        world_size=env.world_size,
        trainable=trainable,
        total=total,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        resumed_from=str(resume_from) if resume_from else None,
    )

    def evaluate_now() -> dict:
        sync_buffers(split.suffix)  # every rank evaluates the model that is saved (rank 0's buffers)
        suffix_eval = suffix

        def forward(x: torch.Tensor) -> torch.Tensor:
            feats = prefix(x) if prefix is not None else x
            return suffix_eval(feats if suffix_dtype is None else feats.to(suffix_dtype))

        if prefix is not None:
            prefix.eval()
        split.suffix.eval()
        out = run_evaluation(
            forward,
            val_loader,
            num_classes=num_classes,
            device=device,
            precision=precision,
            channels_last=cfg.model.channels_last and prefix is not None,
            pad_to=eval_bs if target != "none" else 0,
            classes=index.classes,
            heads=len(grid) if bank is not None else 0,
        )
        if bank is None:
            return out
        # Keep the best head as the run's head (so every checkpoint and export is a plain model).
        key, sign = cfg.checkpoint.best_metric, 1 if cfg.checkpoint.best_mode == "max" else -1
        best_i = max(range(len(out)), key=lambda i: sign * out[i][key])
        model.get_submodule(model.fastft_head).load_state_dict(bank.heads[best_i].state_dict())
        report = dict(out[best_i])
        report["sweep"] = [
            {"head": i, "lr": lr, "weight_decay": wd, "top1": r["top1"], key: r[key], "loss": r["loss"]}
            for i, ((lr, wd), r) in enumerate(zip(grid, out))
        ]
        report["sweep_best"] = best_i
        report["sweep_table"] = sweep_table(grid, out, key, best_i)
        return report

    # 7. The loop.
    criterion_ls = cfg.optim.label_smoothing
    throughput: dict[str, float] = {}
    timings: dict[str, dict] = {}
    report: dict = {}
    global_batch = cfg.data.batch_size * env.world_size
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        due = [u for u in plan if u.epoch == epoch + 1]
        if due:
            # Unfreezing moves the prefix/suffix cut: drop the feature cache (the prefix changed), re-split,
            # recompile and re-wrap; the optimizer gains groups and keeps the old groups' state.
            for u in due:
                newly = _apply_unfreeze(model, u, optimizer, cfg)
                log.info(
                    "fastft: epoch %d: unfroze %s (%s tensors, lr x%g)", epoch + 1, u.module, len(newly), u.lr_factor
                )
                logger.event("unfreeze", epoch=epoch + 1, module=u.module, tensors=len(newly), lr_factor=u.lr_factor)
            plan = [u for u in plan if u.epoch != epoch + 1]
            scheduler.apply()
            split = split_model(model)
            train_loader, val_loader = image_loaders
            assemble()
        if prefix is not None:
            prefix.eval()  # frozen: running statistics and dropout never change
        split.suffix.train()
        train_loader.set_epoch(epoch, start_batch)
        bar = _progress(cfg, env, len(train_loader) - start_batch, f"epoch {epoch + 1}/{epochs}")
        t0, seen, loss_n = time.perf_counter(), 0, 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        if resumed_stats is not None:  # continuing a partial epoch: its first batches count in the epoch mean
            loss_sum += resumed_stats["loss_sum"]
            loss_n, seen = resumed_stats["loss_n"], resumed_stats["seen"]
            resumed_stats = None
        seen0 = seen
        timer = StepTimer(device, enabled=cfg.log.step_timing)
        usable = steps_per_epoch * accum  # trailing micro-batches that cannot fill a step are dropped
        timer.start()
        for batch_idx, (images, labels) in enumerate(train_loader, start=start_batch):
            if batch_idx >= usable or step >= total_steps:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if cfg.model.channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            timer.mark("data")
            if prefix is not None:
                # The frozen prefix builds no autograd graph; clone turns its inference tensor into a normal one.
                with torch.inference_mode(), precision.autocast():
                    feats = prefix(images)
                feats = feats.clone()
            else:
                feats = images
            if suffix_dtype is not None:  # the wrapped suffix computes in its own dtype (DeepSpeed bf16/fp16)
                feats = feats.to(suffix_dtype)
            timer.mark("frozen")
            boundary = (batch_idx + 1) % accum == 0
            with backend.no_sync() if not boundary else contextlib.nullcontext():
                with precision.autocast():
                    logits = train_module(feats)
                if bank is None:
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=criterion_ls)
                else:  # sum of the heads' mean losses: each head gets exactly its own gradient
                    per = F.cross_entropy(
                        logits.float().flatten(0, 1),
                        labels.repeat(len(grid)),
                        label_smoothing=criterion_ls,
                        reduction="none",
                    )
                    loss = per.view(len(grid), -1).mean(dim=1).sum()
                if _eager_checks(device) and not torch.isfinite(loss):  # free on CPU; on GPU checked below
                    _nonfinite(loss.detach(), epoch, step + 1, run_dir)
                backend.backward(loss)
            timer.mark("trainable")
            loss_sum += loss.detach()
            loss_n += 1
            seen += images.shape[0]
            if bar is not None:
                bar.update(1)
            backend.step(boundary)
            timer.mark("optimizer")
            if not boundary:
                continue
            if _eager_checks(device) and not backend.grads_finite():  # on GPU: at log cadence and in every save
                _nonfinite(float("nan"), epoch, step + 1, run_dir, what="gradient norm")
            scheduler.step()
            step += 1
            saving = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
            if step % cfg.log.every_steps == 0 or saving:
                mean_loss = loss_sum.item() / loss_n  # one host sync per log interval
                if not math.isfinite(mean_loss):  # before any save: the last good checkpoint is never overwritten
                    _nonfinite(mean_loss, epoch, step, run_dir)
                if not backend.grads_finite():
                    _nonfinite(float("nan"), epoch, step, run_dir, what="gradient norm")
                if env.is_main:
                    lr = optimizer.param_groups[0]["lr"]
                    logger.event("step", epoch=epoch, step=step, loss=mean_loss, lr=lr)
                    logger.scalars(step, {"train/loss": mean_loss, "train/lr": lr})
                    if bar is not None:
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{seen * env.world_size / elapsed:.0f}")
            if saving:
                save("last.pt", epoch, batch_idx + 1)
            if stop.requested():  # SIGTERM / SIGUSR1: save this step boundary, then end (resume=auto continues)
                if not saving:
                    save("last.pt", epoch, batch_idx + 1)
                _stopped(stop.received, epoch, step, run_dir)
            timer.start()
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        img_s = (seen - seen0) * env.world_size / elapsed if elapsed > 0 else 0.0
        throughput[f"epoch{epoch}"] = img_s
        timings[f"epoch{epoch}"] = {**timer.result(), "wall": elapsed, "images": (seen - seen0) * env.world_size}
        if cfg.log.step_timing:
            _log_timing(logger, epoch, timings[f"epoch{epoch}"])
        train_loss = loss_sum.item() / max(loss_n, 1)
        if not math.isfinite(train_loss):
            _nonfinite(train_loss, epoch, step, run_dir)
        start_batch = 0
        last_epoch = epoch + 1 == epochs or step >= total_steps
        logger.scalars(epoch, {"train/epoch_loss": train_loss, "train/img_per_s": img_s})
        if (epoch + 1) % cfg.run.eval_every_epochs == 0 or last_epoch:
            report = evaluate_now()
            key = cfg.checkpoint.best_metric
            if key not in report:
                raise ConfigError(
                    f"checkpoint.best_metric: {key!r} is not a report key "
                    f"({', '.join(k for k, v in report.items() if isinstance(v, float))})"
                )
            value = report[key]
            better = best["value"] is None or (
                value > best["value"] if cfg.checkpoint.best_mode == "max" else value < best["value"]
            )
            if better:
                best = {"metric": key, "value": value, "epoch": epoch + 1}
            logger.event(
                "eval",
                epoch=epoch + 1,
                step=step,
                train_loss=train_loss,
                img_per_s=img_s,
                **{k: v for k, v in report.items() if isinstance(v, float)},
            )
            logger.scalars(epoch + 1, {k: v for k, v in report.items() if isinstance(v, float)}, prefix="val/")
            log.info(
                "fastft: epoch %d/%d  train loss %.4f  %s %.4f  top1 %.4f  %.1f img/s",
                epoch + 1,
                epochs,
                train_loss,
                key,
                value,
                report["top1"],
                img_s,
            )
        else:
            better = False
        want_last = bool(cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0) or last_epoch
        if better:
            save("best.pt", epoch + 1, 0)
        if want_last and better and whole[0]:
            # The same state as best.pt, just written: link it rather than write it twice. (A crash before the link
            # leaves last.pt at the previous save, so a resume redoes this epoch. A backend that keeps state beside
            # the file names that state by tag, so there each name gets its own save.)
            if env.is_main:
                ckpt_io.atomic_link(run_dir / "best.pt", run_dir / "last.pt")
        elif want_last:
            save("last.pt", epoch + 1, 0)

    # 8. Outputs: report, exports (full model and head alone) on rank 0.
    paths: dict[str, Path] = {"run_dir": run_dir, "last": run_dir / "last.pt", "best": run_dir / "best.pt"}
    if not report:
        report = evaluate_now()
    final_state = model_state()
    if env.is_main:
        from fastft.report import confusion_figure

        sweep_text = report.pop("sweep_table", None)
        if cfg.data.loader == "synthetic":
            report["synthetic_data"] = True  # one random batch: the metrics say nothing about the data folder
        paths.update(write_report(report, run_dir))
        logger.figure("val/confusion_matrix", confusion_figure(report), epochs)
        logger.hparams(
            {
                "model": cfg.model.name,
                "freeze": str(cfg.model.freeze),
                "lr": cfg.optim.lr,
                "optim": cfg.optim.name,
                "batch_size": global_batch,
                "precision": precision.name,
            },
            {k: report.get(k) for k in ("top1", "f1_macro", "loss")},
        )
        head = model.get_submodule(model.fastft_head)
        head_prefix = f"{model.fastft_head}."
        head_state = {k.removeprefix(head_prefix): v for k, v in final_state.items() if k.startswith(head_prefix)}
        paths["model_export"] = ckpt_io.export_safetensors(
            model, run_dir / "model.safetensors", {**meta, "part": "model"}, final_state
        )
        paths["head_export"] = ckpt_io.export_safetensors(
            head, run_dir / "head.safetensors", {**meta, "part": "head"}, head_state
        )
        if backend.skipped_steps:
            log.warning("fastft: the fp16 loss scaler skipped %d of %d steps (overflow)", backend.skipped_steps, step)
        logger.event("end", step=step, best=best, throughput=throughput, skipped_steps=backend.skipped_steps)
        print(format_table(report))
        if sweep_text:
            print(f"head sweep ({len(grid)} heads, kept by {cfg.checkpoint.best_metric}):\n{sweep_text}")
        print(f"run folder: {run_dir}")
    logger.close()
    penv.barrier(env)
    return RunResult(
        run_dir,
        report,
        best,
        paths,
        throughput,
        step,
        timings,
        skipped_steps=backend.skipped_steps,
        feature_cache=feature_cache,
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


def _apply_unfreeze(model, u: UnfreezeStep, optimizer, cfg: FinetuneConfig) -> list[str]:
    newly = unfreeze_module(model, u.module)
    if newly:
        for g in param_groups(
            model, newly, cfg.optim, head=model.fastft_head, lr_factor=u.lr_factor, tag=f"{u.module}:"
        ):
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


def _nonfinite(loss, epoch: int, step: int, run_dir: Path, what: str = "loss"):
    value = f"{what} is not finite" if what != "loss" else f"loss is {float(loss)}"
    kept = [p for p in (run_dir / "last.pt", run_dir / "best.pt") if p.is_file()]
    where = f"the last good checkpoint is kept: {kept[0]}" if kept else f"no checkpoint was written to {run_dir} yet"
    raise FastftError(f"{value} at epoch {epoch + 1}, step {step}: stopping; {where}")


def _feature_sources(cfg: FinetuneConfig, index, spec, env: penv.DistEnv, eval_bs: int):
    """The images the train and val feature tables are computed from. A memory cache is always built, so its
    decode starts now, before the model is built; a disk cache may be reused and starts only when it is not."""
    from fastft.features import ImageSource

    common = {"env": env, "batch_size": eval_bs, "workers": cfg.data.workers, "seed": cfg.run.seed}
    train = ImageSource(index.train, spec, views=cfg.features.views, **common)
    val = ImageSource(index.val, spec, views=0, **common)
    if cfg.features.cache == "memory":
        train.start()
        val.start()
    return train, val


def _cached_loaders(cfg: FinetuneConfig, split, sources, env: penv.DistEnv, precision, eval_bs: int):
    """Build (or reuse) the train and val feature tables: (train loader, val loader, build info)."""
    from fastft.features import FeatureLoader, build_features

    if split.prefix is None:
        raise ConfigError("features.cache: nothing is frozen before the trainable part, so there is nothing to cache")
    if cfg.data.augment and cfg.features.views == 0:
        log.info("fastft: feature cache with features.views=0 trains on the eval transform (no augmentation)")
    cache_dir = Path(cfg.features.dir) if cfg.features.dir else _default_cache() / "features"
    common = {
        "mode": cfg.features.cache,
        "dtype": cfg.features.dtype,
        "cache_dir": cache_dir,
        "env": env,
        "precision": precision,
        "channels_last": cfg.model.channels_last,
    }
    t0 = time.perf_counter()
    train_t = build_features(split.prefix, sources[0], train=True, **common)
    val_t = build_features(split.prefix, sources[1], train=False, **common)
    build_s = time.perf_counter() - t0
    log.info(
        "fastft: feature cache (%s, %s): train %s, val %s in %.1fs",
        cfg.features.cache,
        cfg.features.dtype,
        train_t.source,
        val_t.source,
        build_s,
    )
    train_loader = FeatureLoader(
        train_t, cfg.data.batch_size, train=True, seed=cfg.run.seed, rank=env.rank, world=env.world_size
    )
    val_loader = FeatureLoader(val_t, eval_bs, train=False, seed=cfg.run.seed, rank=env.rank, world=env.world_size)
    info = {
        "wall_s": build_s,
        "images": train_t.num_samples + val_t.num_samples,
        "train": train_t.source,
        "val": val_t.source,
    }
    return train_loader, val_loader, info


def _default_cache() -> Path:
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft"))


def _progress(cfg: FinetuneConfig, env: penv.DistEnv, total: int, desc: str):
    if not (cfg.log.progress and env.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
