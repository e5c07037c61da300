"""Tokenise a text file once: token ids of every row, unpadded, stored as safetensors under a key over everything
that determines them (the tokenizer's files, max_length, the data file's bytes, the tokenizers version)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastft.backbones.base import TextSpec
from fastft.data.text import TextFile
from fastft.errors import DataError

log = logging.getLogger("fastft")

CACHE_FORMAT = 1  # part of the cache key: bump when the stored layout changes
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "config.json",
)


@dataclass
class Tokens:
    """Token ids of every row of one file, unpadded: row r is ids[offsets[r]:offsets[r + 1]]."""

    ids: torch.Tensor  # int32 (total tokens,)
    offsets: torch.Tensor  # int64 (rows + 1,)
    pad_id: int
    source: str  # "built" | "disk" (reused)

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def row(self, r: int) -> torch.Tensor:
        return self.ids[int(self.offsets[r]) : int(self.offsets[r + 1])]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTFT_CACHE", Path.home() / ".cache" / "fastft")) / "text"


def tokens_key(file: TextFile, spec: TextSpec) -> str:
    """A key over everything that determines the tokens: the tokenizer's files, max_length, the data file's bytes and
    the tokenizer library's version."""
    import tokenizers

    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "max_length": spec.max_length,
                "tokenizers": tokenizers.__version__,
                "data": file.sha256,
            }
        ).encode()
    )
    folder = Path(spec.tokenizer)
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            h.update(f"\0{name}\0".encode())
            h.update((folder / name).read_bytes())
    return h.hexdigest()[:24]


def tokenize_file(file: TextFile, spec: TextSpec, *, cache_dir: Path | None = None) -> Tokens:
    """The tokens of every row of `file`, from the cache when its key matches, else tokenised and stored there.

    Ranks that tokenise the same file at once each write a temporary file and rename it into place (same content),
    so a cache is never read half-written."""
    from safetensors.torch import load_file, save_file

    folder = cache_dir if cache_dir is not None else default_cache_dir()
    key = tokens_key(file, spec)
    path = folder / f"{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            ids, offsets, pad = t["ids"], t["offsets"], int(t["pad_id"])
            if offsets.shape == (len(file) + 1,) and int(offsets[-1]) == ids.numel():
                return Tokens(ids, offsets, pad, "disk")
            reason = "stale (row count differs)"
        except Exception as e:  # truncated or overwritten: rebuilt below
            reason = f"unreadable ({type(e).__name__})"
        log.warning("fastft: token cache %s is %s; rebuilding it", path, reason)
    tokens = tokenize(file, spec)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    save_file(
        {"ids": tokens.ids, "offsets": tokens.offsets, "pad_id": torch.tensor(tokens.pad_id)},
        str(tmp),
        metadata={"key": key, "data": str(file.path), "max_length": str(spec.max_length)},
    )
    os.replace(tmp, path)
    return tokens


def tokenize(file: TextFile, spec: TextSpec) -> Tokens:
    """The tokens of every row of `file`, without the cache (DataError when the tokenizer cannot be read)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.tokenizer, use_fast=True, local_files_only=True)
    except Exception as e:
        raise DataError(f"cannot read the tokenizer in {spec.tokenizer}: {str(e).strip().splitlines()[0]}") from None
    if tok.pad_token_id is None:
        raise DataError(f"the tokenizer in {spec.tokenizer} has no pad token (batches are padded with it)")
    ids = tok(file.texts, truncation=True, max_length=spec.max_length, padding=False)["input_ids"]
    lengths = torch.tensor([0] + [len(x) for x in ids], dtype=torch.int64)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.int32)
    return Tokens(flat, torch.cumsum(lengths, 0), int(tok.pad_token_id), "built")
