"""Evaluation and prediction from a saved checkpoint (the training side lives in train.py)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastft import outputs
from fastft.checkpoint import load_checkpoint, load_model_checkpoint, weights_place
from fastft.config import DataConfig, ModelConfig, PrecisionConfig
from fastft.data.index import index_for_eval, list_images
from fastft.data.loaders import build_loader
from fastft.data.transforms import TransformSpec
from fastft.ema import apply_saved
from fastft.errors import CheckpointError, ConfigError, DataError, FastftError
from fastft.evaluation import run_evaluation
from fastft.model import build_model, load_state_file
from fastft.parallel import env as penv
from fastft.precision import resolve_precision
from fastft.report import format_table, write_report


@dataclass
class EvalResult:
    metrics: dict
    paths: dict[str, Path] = field(default_factory=dict)


def load_trained(checkpoint: str | Path, device: torch.device):
    """Rebuild the trained model from a fastft checkpoint (weights_only load) or its `model.safetensors` export.

    A probe checkpoint's frozen part is rebuilt from its weights source, as training built it, and checked against
    the checkpoint's fingerprint (fastft.checkpoint.load_model_checkpoint). Returns (model, meta)."""
    state = read_trained(checkpoint)
    meta, frozen = state["meta"], state.get("frozen")
    if meta.get("source") == "hf":
        from fastft.text_eval import build_text_model

        backbone = build_text_model(meta, state, checkpoint)  # the EMA's weights when the run picked them
        if "ema" in state:
            meta = {**meta, "ema_weights": backbone.ema_weights}
        return backbone.model.to(device).eval(), meta
    mcfg = ModelConfig(
        source=meta.get("source", "torchvision"),  # checkpoints from before timm record no source
        name=meta["model_name"],
        weights=frozen["weights"] if frozen else "none",
        head_hidden=meta["head_hidden"],
        head_dropout=meta["head_dropout"],
    )
    try:
        model = build_model(
            mcfg, meta["num_classes"], image_size=meta["transform"]["crop_size"], pretrained_ok=frozen is not None
        )
    except FastftError as e:
        if frozen is None:
            raise
        where = weights_place(frozen)
        raise CheckpointError(f"{checkpoint}: cannot rebuild its frozen part from {where}: {e}") from None
    load_model_checkpoint(model, state, checkpoint)
    if "ema" in state:  # a run with an EMA: its weights when the run's best_metric picks them (fastft.ema)
        meta = {**meta, "ema_weights": apply_saved(model, state, checkpoint)}
    return model.to(device).eval(), meta


def read_trained(checkpoint: str | Path) -> dict:
    """The saved state of a fastft checkpoint (weights_only) or model export: "model", "meta" and, for a probe
    checkpoint, the frozen part's "frozen" fingerprint."""
    if str(checkpoint).endswith(".safetensors"):
        return {"model": load_state_file(checkpoint), "meta": _export_meta(Path(checkpoint))}
    return load_checkpoint(checkpoint)


def _is_text(meta: dict) -> bool:
    return meta.get("source") == "hf"


def _export_meta(path: Path) -> dict:
    """The metadata fastft embeds in its safetensors exports (model name, classes, transform, head)."""
    import json

    from safetensors import safe_open

    from fastft.errors import CheckpointError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["fastft"])
    except Exception:
        raise CheckpointError(f"{path}: not a fastft model export (no fastft metadata)") from None
    if meta.get("part") != "model":
        raise CheckpointError(f"{path}: a {meta.get('part')} export; evaluate the full model.safetensors")
    return meta


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    out_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 2,
    loader: str = "torch",
    precision: str = "auto",
    device: str = "auto",
    print_report: bool = False,
    overwrite: bool = False,
) -> EvalResult:
    """Evaluate a checkpoint on an image folder of class folders (names must be among the trained classes), or a text
    model on a `.csv`/`.jsonl` file of text,label rows.

    Distributed-aware: under torchrun each rank evaluates its shard and the metrics are synced exactly. `out_dir`
    is checked before anything runs (see fastft.outputs); an existing report there is replaced only with `overwrite`.
    """
    check_options(batch_size=batch_size, workers=workers, device=device, loader=loader, precision=precision)
    if out_dir is not None:
        outputs.check_report_target(Path(out_dir), checkpoint=Path(checkpoint), data=Path(data), overwrite=overwrite)
    env = penv.init_distributed(device)
    dl = None
    try:
        model, meta = load_trained(checkpoint, env.device)
        prec = resolve_precision(PrecisionConfig(dtype=precision), env.device)
        if _is_text(meta):
            from fastft.text_eval import evaluate_text

            if loader == "dali":
                raise ConfigError("--loader: dali decodes images; a text model's rows are tokenised (use torch)")
            report = evaluate_text(model, meta, Path(data), batch_size=batch_size, env=env, precision=prec)
        else:
            task = meta.get("task", "multiclass")
            samples = _eval_samples(Path(data), meta)
            spec = TransformSpec.from_dict(meta["transform"])
            dcfg = DataConfig(
                root=str(data), batch_size=batch_size, workers=workers, loader=loader, persistent_workers=False
            )
            dl = build_loader(samples, spec, dcfg, train=False, seed=0, env=env)
            report = run_evaluation(
                model,
                dl,
                num_classes=meta["num_classes"],
                device=env.device,
                precision=prec,
                classes=meta["classes"],
                task=task,
                threshold=meta.get("threshold", 0.5),
                thresholds=meta.get("thresholds"),  # per-label ones saved with the model: reported as well
            )
        paths: dict[str, Path] = {}
        if out_dir is not None and env.is_main:
            paths = write_report(report, Path(out_dir))
        if print_report and env.is_main:
            print(format_table(report))
        penv.barrier(env)  # no rank tears the group down while rank 0 still writes
        return EvalResult(report, paths)
    finally:
        if dl is not None:
            dl.close()  # workers end with the call, also when it raises
        penv.shutdown(env)


def _eval_samples(data: Path, meta: dict) -> list:
    """The samples `evaluate` reads: a folder of class folders, or for a multilabel model a CSV/JSONL of path,labels
    (labels among the trained ones)."""
    if meta.get("task") != "multilabel":
        return index_for_eval(data, meta["classes"])
    if data.is_dir():
        raise DataError(f"--data: {data} is a folder; a multilabel model is evaluated on a CSV/JSONL of path,labels")
    from fastft.data.multilabel import samples_for

    return samples_for(data, meta["classes"])


def predict(
    checkpoint: str | Path,
    inputs: str | Path,
    out_csv: str | Path,
    *,
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    on_bad_file: str = "error",
) -> Path:
    """Classify every image under `inputs` (a file or folder, recursively); write path,label,probability rows. A
    text model classifies the texts of a `.txt` file (one per line) or a `.csv`/`.jsonl` file with a text column and
    writes line,text,label,probability rows in the file's order.

        Files are checked first, as for training (`data.on_bad_file`): "error" stops naming the first bad one, "skip"
        leaves it out of the rows (and logs it). `out_csv` is checked before anything runs: never an input, never an
        existing file other than a predictions CSV; it is written atomically."""
    check_options(batch_size=batch_size, workers=workers, device=device)
    out = Path(out_csv)
    outputs.check_predict_target(out, checkpoint=Path(checkpoint), inputs=Path(inputs))
    dev = penv.resolve_device(device, 0)
    model, meta = load_trained(checkpoint, dev)
    src = Path(inputs)
    if _is_text(meta):
        from fastft.text_eval import predict_text

        with outputs.atomic_target(out) as tmp:
            predict_text(model, meta, src, tmp, batch_size=batch_size, device=dev)
        return out
    if src.is_dir():
        files = sorted(list_images(src))  # the training index's rules: hidden entries, folder symlinks
    elif src.exists() or src.is_symlink():
        files = [str(src)]  # a pipe or a dangling link is refused by the file check, naming it
    else:
        raise DataError(f"input not found: {src}")
    if not files:
        raise DataError(f"no images in {src}")
    spec = TransformSpec.from_dict(meta["transform"])
    dcfg = DataConfig(
        batch_size=batch_size, workers=workers, loader="torch", persistent_workers=False, on_bad_file=on_bad_file
    )
    dl = build_loader([(f, 0) for f in files], spec, dcfg, train=False, seed=0, env=penv.DistEnv(device=dev))
    skipped = set(dl.skipped)
    files = [f for f in files if f not in skipped]  # the rows follow the files the loader reads
    classes = meta["classes"]
    multilabel = meta.get("task") == "multilabel"
    i = 0
    try:
        with outputs.atomic_target(out) as tmp, open(tmp, "w", newline="") as f, torch.inference_mode():
            w = csv.writer(f)
            w.writerow(
                [*outputs.MULTILABEL_PREDICTIONS_HEADER.split(","), *classes]
                if multilabel
                else outputs.PREDICTIONS_HEADER.split(",")
            )
            for images, _ in dl:
                logits = model(images.to(dev)).float()
                rows = _multilabel_rows(logits, classes, meta) if multilabel else _rows(logits, classes)
                for row in rows:
                    w.writerow([files[i], *row])
                    i += 1
    finally:
        dl.close()  # workers end with the call, also when it raises
    return out


def _rows(logits: torch.Tensor, classes: list[str]) -> list[list[str]]:
    """label,probability of each image: the most probable class and its softmax probability."""
    p, y = logits.softmax(dim=1).max(dim=1)
    return [[classes[yi], f"{pi:.6f}"] for pi, yi in zip(p.tolist(), y.tolist())]


def _multilabel_rows(logits: torch.Tensor, classes: list[str], meta: dict) -> list[list[str]]:
    """labels,<one probability per label> of each image: the labels whose sigmoid probability is above the model's
    per-label thresholds when it has them (eval.tune_thresholds), else its eval.threshold (joined by ';', as in the
    training lists), then every label's probability."""
    probs = logits.sigmoid()
    per = meta.get("thresholds")
    at = meta.get("threshold", 0.5) if per is None else torch.tensor(per, dtype=probs.dtype, device=probs.device)
    picked = probs > at  # torchmetrics' rule in the run's evaluation (float32 against float32)
    return [
        [";".join(c for c, on in zip(classes, hot) if on), *(f"{q:.6f}" for q in row)]
        for row, hot in zip(probs.tolist(), picked.tolist())
    ]


def check_options(
    *, batch_size: int, workers: int, device: str, loader: str = "torch", precision: str = "auto"
) -> None:
    """The eval/predict options, checked as train checks its config (same ranges, same one-line errors)."""
    from fastft.config import FinetuneConfig, check_device

    cfg = FinetuneConfig()
    cfg.data.batch_size, cfg.data.workers, cfg.data.loader = batch_size, workers, loader
    cfg.precision.dtype, cfg.run.device = precision, device
    try:
        cfg.validate()
    except ConfigError as e:  # name the command-line option, not the config key it maps to
        names = {"data.batch_size": "--batch-size", "data.workers": "--workers", "data.loader": "--loader"}
        names |= {"precision.dtype": "--precision", "run.device": "--device"}
        key, rest = str(e).split(":", 1)
        raise ConfigError(f"{names.get(key, key)}:{rest}") from None
    check_device("--device", device)
