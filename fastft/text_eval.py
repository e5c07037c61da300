"""Evaluation, prediction and export of a trained text model (`model.source = "hf"`) from its checkpoint.

- The model is rebuilt from the folder (or hub-cache name) it was trained from, with the checkpoint's classes, then
  the checkpoint is loaded over it: a probe checkpoint's frozen encoder comes from that folder and must match the
  checkpoint's fingerprint (fastft.checkpoint.load_model_checkpoint).
- Rows are tokenised with the run's tokenizer and `max_length` (the checkpoint's TextSpec), batched by length and,
  for evaluation, sharded by rank: every row is counted once, so metrics are exact under any number of ranks.
- `export_pretrained` writes the trained classifier with `save_pretrained` (model and tokenizer): the folder loads
  with `AutoModelForSequenceClassification.from_pretrained` / `AutoTokenizer.from_pretrained`, labels included.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from fastft.backbones.base import TextSpec
from fastft.data.text import TextSplit, read_text_file
from fastft.data.text_loader import TextLoader
from fastft.data.text_tokens import default_cache_dir, tokenize, tokenize_file
from fastft.errors import CheckpointError, DataError, FastftError
from fastft.evaluation import run_evaluation
from fastft.outputs import TEXT_PREDICTIONS_HEADER
from fastft.parallel import env as penv


def build_text_model(meta: dict, state: dict, checkpoint: str | Path):
    """The HFTextBackbone of a text checkpoint, its weights loaded from `state` (fingerprint checked for a probe
    checkpoint; the EMA's weights when the run's best_metric picked them). Raises CheckpointError naming the
    checkpoint when its model folder cannot be read."""
    from fastft.backbones.hf_text import HFTextBackbone
    from fastft.checkpoint import load_model_checkpoint
    from fastft.ema import apply_saved

    spec = TextSpec.from_dict(meta["transform"])
    try:
        backbone = HFTextBackbone(
            meta["model_name"], meta["num_classes"], max_length=spec.max_length, labels=meta["classes"]
        )
    except FastftError as e:
        raise CheckpointError(f"{checkpoint}: cannot rebuild its text model: {e}") from None
    load_model_checkpoint(backbone.model, state, checkpoint)
    backbone.ema_weights = apply_saved(backbone.model, state, checkpoint)  # when the run's best_metric picked the EMA
    return backbone


def _loader(file, labels: list[int], spec: TextSpec, *, batch_size: int, env, cache: bool) -> TextLoader:
    # Texts classified once have nothing to keep in the token cache.
    tokens = tokenize_file(file, spec, cache_dir=default_cache_dir()) if cache else tokenize(file, spec)
    split = TextSplit(file, list(range(len(file))), labels)
    return TextLoader(split, tokens, train=False, batch_size=batch_size, rank=env.rank, world=env.world_size)


def _forward(model: torch.nn.Module):
    from fastft.text_inputs import model_inputs

    return lambda batch: model(model_inputs(batch))


def evaluate_text(model, meta: dict, data: Path, *, batch_size: int, env, precision) -> dict:
    """The exact report of `model` on a `.csv`/`.jsonl` file of text,label rows (labels among the trained classes;
    one that is not is a DataError naming file and line)."""
    file = read_text_file(data)
    idx = {c: i for i, c in enumerate(meta["classes"])}
    for lbl, line in zip(file.labels, file.lines):
        if lbl not in idx:
            raise DataError(f"{file.path}:{line}: label {lbl!r} is not one of the model's classes")
    spec = TextSpec.from_dict(meta["transform"])
    # Each node's first process tokenises into the cache; the others read it after the barrier.
    if env.local_rank != 0:
        penv.barrier(env)
    dl = _loader(file, [idx[c] for c in file.labels], spec, batch_size=batch_size, env=env, cache=True)
    if env.local_rank == 0:
        penv.barrier(env)
    return run_evaluation(
        _forward(model),
        dl,
        num_classes=meta["num_classes"],
        device=env.device,
        precision=precision,
        classes=meta["classes"],
    )


def predict_text(model, meta: dict, src: Path, out_tmp: Path, *, batch_size: int, device: torch.device) -> None:
    """Write `line,text,label,probability` for every text of `src` (.txt: one per line; .csv/.jsonl: a text column)
    into `out_tmp`, in the file's order."""
    file = read_text_file(src, labels=False)
    spec = TextSpec.from_dict(meta["transform"])
    dl = _loader(file, [0] * len(file), spec, batch_size=batch_size, env=penv.DistEnv(device=device), cache=False)
    forward, classes = _forward(model), meta["classes"]
    rows: dict[int, tuple[int, float]] = {}
    with torch.inference_mode():
        for batch, _ in dl:  # sorted by length: the batch's `index` maps back to the file's rows
            probs = forward({k: v.to(device) for k, v in batch.items()}).float().softmax(dim=1)
            p, y = probs.max(dim=1)
            for r, pi, yi in zip(batch["index"].tolist(), p.tolist(), y.tolist()):
                rows[r] = (yi, pi)
    with open(out_tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(TEXT_PREDICTIONS_HEADER.split(","))
        for r in range(len(file)):
            yi, pi = rows[r]
            w.writerow([file.lines[r], file.texts[r], classes[yi], f"{pi:.6f}"])


def export_pretrained(backbone, out: Path) -> list[Path]:
    """`save_pretrained` of the trained model and its tokenizer into `out` (id2label/label2id are the classes)."""
    return backbone.export(out)
