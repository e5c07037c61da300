"""Reading weights files without executing code, shared by every source."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


def is_path(weights: str) -> bool:
    """`model.weights` names a file rather than a preset (DEFAULT, an enum name, none)."""
    return weights.endswith((".pt", ".pth", ".safetensors", ".bin")) or "/" in weights


_init_lock = threading.Lock()


@contextlib.contextmanager
def init_skipped() -> Iterator[None]:
    """Modules built inside, on this thread, skip torch.nn.init's in-place initialisers (kaiming_*, normal_, zeros_,
    ...): for a model whose every parameter and buffer is then loaded strictly from weights, which overwrite them
    anyway. Building torchvision's resnet50 goes from 0.2 s to 0.01 s, vit_b_16 from 0.7 s to 0.08 s (2-core CPU).
    Other threads (an application embedding fastft) initialise as usual meanwhile. Whatever is built inside is
    uninitialised until loaded: only a strict load may follow (a failed one must discard the model)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    owner = threading.get_ident()
    with _init_lock:  # one patcher at a time; the originals always come back
        saved = {n: getattr(nn.init, n) for n in names}
        try:
            for n in names:
                setattr(nn.init, n, _skip_on(owner, saved[n]))
            yield
        finally:
            for n, f in saved.items():
                setattr(nn.init, n, f)


def _skip_on(owner: int, init):
    """`init`, except on thread `owner`, where the tensor is returned as it is."""

    def skip(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if threading.get_ident() == owner:
            return tensor
        return init(tensor, *args, **kwargs)

    return skip


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or torch.load(weights_only=True)."""
    from fastft.errors import CheckpointError

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "refusing to unpickle objects that could run code (only tensors and plain containers are loaded)"
        raise CheckpointError(f"cannot load {p}: {msg}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a fastft checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"cannot load {p}: not a state dict of tensors")
    return obj


def try_load(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Load `state` strictly if every key and shape matches; False (nothing loaded) otherwise."""
    from fastft.checkpoint import describe_mismatch

    if describe_mismatch(model, state):
        return False
    model.load_state_dict(state, strict=True)
    return True


def save_state(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """`model`'s state dict as safetensors (atomically: temp file + rename)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
