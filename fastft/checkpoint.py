"""Checkpoints: atomic writes (temp file + fsync + rename), exact-resume state, and loading that cannot run code.

A checkpoint is a dict of tensors and plain containers only, read back with ``torch.load(weights_only=True)``;
exports of the trained model and head are safetensors files with a JSON sidecar.

A probe checkpoint (the frozen part holds most of the parameters and comes from a weights source) stores only what
training can change, plus a fingerprint of the frozen part: its source and a blake2b digest of its tensors. Loading
rebuilds the frozen part from that source and refuses when the digest differs."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from fastft.backbones.freeze import is_bn, is_frozen_bn
from fastft.direct_file import ALIGN, DirectFile
from fastft.errors import CheckpointError, FastftError
from fastft.saver import Snapshot, Writer, settle

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file or the new one. The
    bytes bypass the page cache where the filesystem allows it (fastft.direct_file): less CPU taken from training."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with DirectFile(tmp) as f, _save_options():
            torch.save(obj, f)
            f.sync_close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_options():
    """torch.save's options for checkpoint writes: no CRC-32 per record (torch.load never checks it, and on a 2-core
    host it was 0.1 s of the writer's 0.22 s of CPU for 283 MB), and each tensor's bytes at a page-aligned offset, so
    that DirectFile writes page-aligned buffers (the snapshot's) without copying them. The file loads everywhere as
    before. Only where torch keeps config overrides per thread (checked once, see `_config_per_thread`): elsewhere a
    patch would change every thread's torch.save meanwhile, so torch's defaults are kept."""
    config = _config_per_thread()
    if config is None:
        return contextlib.nullcontext()
    wanted = {"compute_crc32": False, "storage_alignment": ALIGN}
    return config.patch({f"save.{k}": v for k, v in wanted.items() if hasattr(config.save, k)})


@functools.cache
def _config_per_thread():
    """torch's serialization config module when its overrides are per thread (torch 2.14: yes), else None: a patch
    made on another thread must not show on this one."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: module-level flags only
        return None
    if not hasattr(config, "save") or not hasattr(config, "patch"):
        return None
    key = "save.compute_crc32"
    seen, inside, done = [], threading.Event(), threading.Event()

    def patched() -> None:
        with config.patch({key: not config.save.compute_crc32}):
            inside.set()
            done.wait(5)

    base = config.save.compute_crc32
    t = threading.Thread(target=patched, daemon=True)
    t.start()
    if inside.wait(5):
        seen.append(config.save.compute_crc32)
    done.set()
    t.join()
    return config if seen == [base] else None  # not seen: the patch itself failed


def atomic_link(src: Path, dst: Path) -> None:
    """Make `dst` hold what `src` holds now, without writing it twice: a hard link, swapped in by rename (a copy where
    the filesystem has no hard links). Safe because every checkpoint write replaces the file (atomic_save) rather
    than rewriting it, so a later save of `src` leaves `dst` as it was."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a stale temp name could be a link to a live file, which the copy would overwrite
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a fastft checkpoint with weights_only=True; a malicious or broken file raises CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            reason = "it contains pickled objects that could run code; only tensors and plain containers are loaded"
        else:
            reason = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {p}: {reason}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{p} is not a fastft checkpoint (no 'model'/'meta' entries)")
    return ckpt


def describe_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """None when `state` fits `model` exactly; otherwise the first missing/unexpected keys and shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} != model {tuple(own[k].shape)}"
        for k in own
        if k in state and own[k].shape != state[k].shape
    ]
    what = []
    if missing:
        what.append(f"missing keys {missing[:3]}")
    if extra:
        what.append(f"unexpected keys {extra[:3]}")
    if shapes:
        what.append(f"shape mismatch {shapes[0]}")
    return "; ".join(what) or None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Strict load that names the file and the first mismatching keys/shapes instead of a traceback wall."""
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{path} does not match the model: {problem}")
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------------------
# Probe checkpoints: the trainable state + a fingerprint of the frozen part


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict keys training can change: every parameter that requires grad, and the buffers of a module that
    trains (one with a trainable parameter of its own, or a BatchNorm that is not frozen: in train mode it updates its
    running statistics, even parameter-less). A frozen BatchNorm stays in eval, so its buffers never change."""
    keys: set[str] = set()
    for prefix, m in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = list(m.named_parameters(recurse=False))
        keys |= {dot + n for n, p in own if p.requires_grad}
        if any(p.requires_grad for _, p in own) or (is_bn(m) and not is_frozen_bn(m)):
            keys |= {dot + n for n, _ in m.named_buffers(recurse=False)}
    return keys


def frozen_keys(model: nn.Module) -> list[str]:
    """The state-dict keys a probe checkpoint leaves to the weights source (state-dict order). A frozen tensor that is
    no longer fp32 (DeepSpeed casts the whole wrapped part to bf16/fp16) no longer equals its source: it is stored."""
    train = trainable_keys(model)
    return [
        k
        for k, v in model.state_dict().items()
        if k not in train and not (v.is_floating_point() and v.dtype not in (torch.float32, torch.float64))
    ]


def uses_probe_format(model: nn.Module, weights: str) -> bool:
    """The rule: a probe checkpoint when the frozen parameters are more than half of the model's and come from a
    weights source (a pretrained tag or a file). Random weights (`none`) cannot be rebuilt: a full checkpoint."""
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return weights.lower() not in ("none", "") and 2 * frozen > total


def frozen_digest(state: dict[str, torch.Tensor], keys: list[str]) -> tuple[str, int]:
    """(blake2b hex digest, bytes hashed) over `keys` in name order: each key, dtype, shape and the tensor's bytes
    (contiguous, on the CPU, so channels_last and the device do not change it)."""
    h = hashlib.blake2b(digest_size=32)
    total = 0
    for k in sorted(keys):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)};".encode())
        data = t.reshape(-1).view(torch.uint8).numpy()
        h.update(data)
        total += data.nbytes
    return h.hexdigest(), total


def weights_place(frozen: dict[str, Any]) -> str:
    """Where a probe checkpoint's frozen part comes from, as the error names it."""
    from fastft.backbones.weights import is_path

    w = frozen["weights"]
    return w if is_path(w) else f"{frozen['source']}:{frozen['name']} (weights {w})"


def load_model_checkpoint(model: nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's model state into `model`: a full one strictly; a probe one over the frozen part `model` was
    rebuilt with, after checking that part against the fingerprint (CheckpointError, one line, when it differs)."""
    frozen = ckpt.get("frozen")
    if frozen is None:
        load_model_state(model, ckpt["model"], path)
        return
    own = model.state_dict()
    keys = [k for k in own if k not in ckpt["model"]]
    problem = describe_mismatch(model, {**{k: own[k] for k in keys}, **ckpt["model"]})  # unexpected keys, shapes
    if problem:
        raise CheckpointError(f"{path} does not match the model: {problem}")
    digest, _ = frozen_digest(own, keys)
    if len(keys) != frozen["tensors"] or digest != frozen["blake2b"]:
        raise CheckpointError(
            f"{path}: the weights at {weights_place(frozen)} changed since the run: the frozen part they give "
            f"({len(keys)} tensors, not stored in this checkpoint) does not match the checkpoint's fingerprint"
        )
    model.load_state_dict(ckpt["model"], strict=False)


def export_safetensors(
    module: nn.Module, path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Save a module's state dict (or `state`, the same keys) as safetensors (+ `<path>.json` with the metadata
    needed to rebuild it)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_state_with_meta(state or module.state_dict(), tmp, meta)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def save_state_with_meta(state: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> None:
    """A state dict as a safetensors file carrying fastft's metadata (what load_trained reads back)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path), metadata={"fastft": json.dumps(meta)})


# --------------------------------------------------------------------------------------------------------------------
# The run's checkpoints


def refuse_nonfinite(value, epoch: int, step: int, run_dir: Path, what: str = "loss") -> NoReturn:
    """Stop the run on a non-finite loss, gradient or weight, naming the last good checkpoint (never overwritten)."""
    settle()  # a checkpoint write in flight is finished first: the message names what is on disk
    text = f"{what} is not finite" if what != "loss" else f"loss is {float(value)}"
    kept = [p for p in (run_dir / "last.pt", run_dir / "best.pt") if p.is_file()]
    where = f"the last good checkpoint is kept: {kept[0]}" if kept else f"no checkpoint was written to {run_dir} yet"
    raise FastftError(f"{text} at epoch {epoch + 1}, step {step}: stopping; {where}")


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts/lists (the optimizer's state), keyed by position, for all_finite."""
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {f"{k}/{sub}": t for k, v in items for sub, t in _tensors(v).items()}


class Checkpointer:
    """A run's checkpoint files: step saves and last.pt, best.pt (last.pt linked to it when they hold the same state),
    the fp32 masters from the backend, the finiteness check before every save, and restore.

    Every rank calls save (RNG states are gathered, sharded optimizer state is written by every rank); rank 0 writes
    the file. `sweep`: a head sweep whose bank is saved beside the model; `ema`: the weights' EMA, saved likewise."""

    def __init__(
        self,
        run_dir: Path,
        *,
        env,
        model: nn.Module,
        backend,
        optimizer,
        scheduler,
        meta: dict,
        sweep=None,
        ema=None,
        background: bool = True,
    ):
        self.run_dir, self.env, self.model, self.backend = run_dir, env, model, backend
        self.optimizer, self.scheduler, self.meta, self.sweep = optimizer, scheduler, meta, sweep
        self.ema = ema  # fastft.ema.Ema or None: its state is saved beside the model's (both raw and EMA weights)
        self._whole = False  # the file written last holds the whole state (no optimizer state kept beside it)
        self._digest: tuple[tuple[str, ...], str, int] | None = None  # (frozen keys, digest, bytes) last hashed
        self.writer, self.snapshot = Writer(background=background), Snapshot()

    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's state dict with full-precision weights: where the backend trains a bf16/fp16 copy (DeepSpeed),
        its fp32 masters replace the copy and the rest is cast back to fp32. Collective: every rank calls it."""
        masters = self.backend.master_weights()
        state = self.model.state_dict()
        if masters:
            names = {id(p): n for n, p in self.model.named_parameters()}
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            state.update({names[i]: t for i, t in masters.items() if i in names})
        return state

    def fingerprint(self) -> dict[str, Any] | None:
        """The frozen part's fingerprint when this save is a probe checkpoint (uses_probe_format), else None. The
        digest is computed once per frozen set: frozen tensors never change, and an unfreeze changes the set."""
        mcfg = self.meta.get("config", {}).get("model", {})
        if not uses_probe_format(self.model, mcfg.get("weights", "none")):
            return None
        keys = frozen_keys(self.model)
        if self._digest is None or self._digest[0] != tuple(keys):
            self._digest = (tuple(keys), *frozen_digest(self.model.state_dict(), keys))
        return {
            "source": mcfg.get("source", "torchvision"),
            "name": mcfg.get("name"),
            "weights": mcfg["weights"],
            "tensors": len(keys),
            "bytes": self._digest[2],
            "blake2b": self._digest[1],
        }

    def save(
        self, name: str, *, epoch: int, batch: int, step: int, best: dict, stats: dict | None, link: str | None = None
    ) -> bool:
        """Write `name` (last.pt / best.pt) for position (epoch, batch); `stats`: the partial epoch's loss sums.

        The state is checked and copied to host memory here, on every rank (the collectives stay on this thread);
        rank 0's file is then written in the background (see fastft.saver), after the previous write is done.
        `link`: also make that file hold this state (atomic_link, after this write) where the file holds the whole
        state; returns whether it will."""
        self.writer.wait()  # one write in flight; a failed one is raised here, before anything else is written
        state = self._state(name, epoch=epoch, batch=batch, step=step, best=best, stats=stats)
        linking = link is not None and self._whole
        if state is None:
            return linking
        path = self.run_dir / name
        then = self.run_dir / link if linking else None
        if self._whole:
            state = self.snapshot.take(state)  # training goes on changing the tensors in place

        def write() -> None:
            atomic_save(state, path)
            if then is not None:
                atomic_link(path, then)  # only once the file is complete: a crash before leaves `then` as it was

        if self._whole:
            self.writer.submit(path, write)
        else:
            # The backend keeps state beside the file (DeepSpeed), named by the file: written here, in order.
            write()
        return linking

    def _state(self, name: str, *, epoch: int, batch: int, step: int, best: dict, stats: dict | None) -> dict | None:
        """The checkpoint's content on rank 0 (None on the other ranks), after refusing any non-finite weight."""
        from fastft.parallel.backend import all_finite

        rngs, stats_all = [rng_state()], [stats if batch else None]
        if self.env.distributed:
            gathered: list = [None] * self.env.world_size
            torch.distributed.all_gather_object(gathered, (rngs[0], stats_all[0]))
            rngs, stats_all = [g[0] for g in gathered], [g[1] for g in gathered]
        # Nothing non-finite is ever written, whatever the device's check cadence in the loop: the gradient flag (set
        # where the backend computes a gradient norm anyway), the weights and the optimizer's state are checked before
        # the first byte (the same verdict on every rank). A non-finite gradient reaches the weights at its step.
        shown = epoch - 1 if batch == 0 else epoch  # the epoch the state comes from (0-based)
        if not self.backend.grads_finite():
            refuse_nonfinite(float("nan"), shown, step, self.run_dir, what="gradient norm")
        weights = self.model_state()
        changing = trainable_keys(self.model)  # the frozen tensors never change: not checked at every save
        if not all_finite({k: v for k, v in weights.items() if k in changing}):
            refuse_nonfinite(float("nan"), shown, step, self.run_dir, what="a weight")
        opt_state = self.backend.save_optimizer_state(self.run_dir, name.removesuffix(".pt"))  # collective if sharded
        if opt_state is not None and not all_finite(_tensors(opt_state["state"])):
            refuse_nonfinite(float("nan"), shown, step, self.run_dir, what="the optimizer state")
        self._whole = opt_state is not None
        if self.ema is not None:
            self.ema.sync()  # collective: rank 0's averaged BatchNorm statistics, as for the model
        if not self.env.is_main:
            return None
        extra = {"sweep_bank": self.sweep.state_dict()} if self.sweep is not None else {}
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        frozen = self.fingerprint()
        if frozen is not None:
            extra["frozen"] = frozen
            left = set(self._digest[0])  # rebuilt from the weights source on load
            weights = {k: v for k, v in weights.items() if k not in left}
        return {
            **extra,
            "model": weights,
            "optimizer": opt_state,
            "scheduler": self.scheduler.state_dict(),
            "backend": self.backend.state_dict(),
            "rng": rngs,
            "epoch_stats": stats_all,  # the partial epoch's loss sums, so its logged mean stays right
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "best": best,
            "meta": self.meta,
        }

    def save_epoch_end(self, epoch: int, *, better: bool, want_last: bool, step: int, best: dict) -> None:
        """After epoch `epoch` (1-based, complete): best.pt when the metric improved, last.pt when due."""
        linked = False
        if better:
            # The same state as best.pt: linked to it once written rather than written twice. (A crash before the
            # link leaves last.pt at the previous save, so a resume redoes this epoch. A backend that keeps state
            # beside the file names that state by tag, so there each name gets its own save.)
            linked = self.save(
                "best.pt", epoch=epoch, batch=0, step=step, best=best, stats=None, link="last.pt" if want_last else None
            )
        if want_last and not linked:
            self.save("last.pt", epoch=epoch, batch=0, step=step, best=best, stats=None)

    def wait(self) -> None:
        """Block until the checkpoint write in flight is on disk; CheckpointError (one line) when it failed."""
        self.writer.wait()

    def close(self) -> None:
        """At the run's end, also when it fails: the write in flight finishes before the process goes on."""
        self.writer.wait()

    def restore(self, state: dict[str, Any], path: Path) -> None:
        """Model, sweep bank, optimizer, schedule, backend counters and this rank's RNG from a checkpoint read by
        load_checkpoint (the position, best and epoch stats are the caller's)."""
        load_model_checkpoint(self.model, state, path)
        if self.sweep is not None:
            self.sweep.load_state_dict(state["sweep_bank"], path)
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), path)
        self.backend.load_optimizer_state(state["optimizer"], path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.backend.load_state_dict(state["backend"])
        set_rng_state(state["rng"][min(self.env.rank, len(state["rng"]) - 1)])
