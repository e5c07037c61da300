"""Checkpoints: atomic writes (temp file + fsync + rename), exact-resume state, and loading that cannot run code.

A checkpoint is a dict of tensors and plain containers only, read back with ``torch.load(weights_only=True)``;
exports of the trained model and head are safetensors files with a JSON sidecar."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastft.errors import CheckpointError

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
    """Write to a temp file in the same folder, fsync, then rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


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


def export_safetensors(
    module: nn.Module, path: Path, meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Save a module's state dict (or `state`, the same keys) as safetensors (+ `<path>.json` with the metadata
    needed to rebuild it)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in (state or module.state_dict()).items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"fastft": json.dumps(meta)})
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return path
