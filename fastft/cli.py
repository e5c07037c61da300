"""Command line: fastft train | eval | predict | demo.

Bad input ends with one line `fastft: error: <what>` and exit code 2, never a traceback wall."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from fastft.errors import ConfigError, FastftError

EXIT_BAD_INPUT = 2


def _overrides(extra: list[str]) -> list[str]:
    """Collect `--section.key=value` (or `--section.key value`) overrides; anything else is an error."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {item!r} (overrides look like --section.key=value)")
        if "=" not in item:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise ConfigError(f"override {item!r} has no value (use {item}=VALUE)")
            item = f"{item}={extra[i + 1]}"
            i += 1
        out.append(item)
        i += 1
    return out


_INFERENCE_DEFAULTS = {
    "batch_size": 64,
    "workers": 2,
    "loader": "torch",
    "precision": "auto",
    "device": "auto",
    "on_bad_file": "error",
}


def _inference_options(args: argparse.Namespace, extra: list[str]) -> dict:
    """eval/predict options: the flags, else a run file (--config) with --section.key=value overrides, else the
    defaults. The run file is validated like train's, so its errors name the key."""
    from_cfg: dict = {}
    if args.config or extra:
        from fastft.config import load_config

        cfg = load_config(args.config, _overrides(extra))
        from_cfg = {
            "batch_size": cfg.data.eval_batch_size or cfg.data.batch_size,
            "workers": cfg.data.workers,
            "loader": cfg.data.loader,
            "precision": cfg.precision.dtype,
            "device": cfg.run.device,
            "on_bad_file": cfg.data.on_bad_file,
        }
    flags = {name: getattr(args, name, None) for name in _INFERENCE_DEFAULTS}
    return {
        name: flags[name] if flags[name] is not None else from_cfg.get(name, default)
        for name, default in _INFERENCE_DEFAULTS.items()
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft", description="Fast, exact fine-tuning of torchvision backbones.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune as configured: --config run.toml plus --section.key=value overrides")
    t.add_argument("--config", help="TOML run file")
    t.add_argument("--resume", help="checkpoint to resume from, or 'auto' (the run folder's last.pt)")
    t.add_argument("--overwrite", action="store_true", help="reuse an existing run folder")
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a folder of class folders (multilabel: a list)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", help="folder for metrics.json, confusion_matrix.png and report.html")
    e.add_argument("--config", help="TOML run file for the options below (plus --section.key=value overrides)")
    e.add_argument("--batch-size", type=int, help="alias of --data.batch_size (default 64)")
    e.add_argument("--workers", type=int, help="alias of --data.workers (default 2)")
    e.add_argument("--loader", choices=("torch", "dali"), help="alias of --data.loader (default torch)")
    e.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), help="alias of --precision.dtype")
    e.add_argument("--device", help="alias of --run.device (default auto)")
    e.add_argument("--overwrite", action="store_true", help="replace a report fastft wrote before in --out")
    e.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    r = sub.add_parser("predict", help="classify images; writes path,label,probability CSV")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--input", required=True, help="an image or a folder (searched recursively)")
    r.add_argument("--out", required=True, help="CSV file to write")
    r.add_argument("--config", help="TOML run file for the options below (plus --section.key=value overrides)")
    r.add_argument("--batch-size", type=int, help="alias of --data.batch_size (default 64)")
    r.add_argument("--workers", type=int, help="alias of --data.workers (default 2)")
    r.add_argument("--device", help="alias of --run.device (default auto)")
    r.add_argument("--on-bad-file", choices=("error", "skip"), help="alias of --data.on_bad_file (default error)")

    x = sub.add_parser("export", help="write a trained model as ONNX, safetensors or TorchScript (+ preprocess.json)")
    x.add_argument("--checkpoint", required=True, help="best.pt, last.pt or a model.safetensors export")
    x.add_argument("--format", default="onnx", help="onnx (default) | safetensors | torchscript | hf (text: hf, onnx)")
    x.add_argument("--out", required=True, help="folder to write into")
    x.add_argument("--overwrite", action="store_true", help="replace files of the same names in --out")

    d = sub.add_parser("demo", help="generate a small dataset and fine-tune a pretrained model on it")
    d.add_argument(
        "--task", choices=("image", "text"), default="image", help="image: shapes + resnet18; text: sentences + MiniLM"
    )
    d.add_argument("--out-dir", default="runs")
    d.add_argument("--data-dir", default=None, help="where the generated dataset is cached")
    d.add_argument("--epochs", type=int, default=None)
    from fastft.benchmark.cli import add_bench_parser

    add_bench_parser(sub)
    return p


def run(argv: list[str]) -> int:
    args, extra = _parser().parse_known_args(argv)
    from fastft.logging import setup_console

    setup_console(int(os.environ.get("RANK", "0")))
    if args.command == "train":
        overrides = _overrides(extra)
        if args.resume:
            overrides.append(f"--checkpoint.resume={args.resume}")
        if args.overwrite:
            overrides.append("--run.overwrite=true")
        import fastft
        from fastft import timing
        from fastft.config import load_config
        from fastft.outputs import check_config_file
        from fastft.train import finetune

        timing.PROCESS_T0 = fastft._IMPORT_T0  # the run's set-up timings start with the imports

        cfg = load_config(args.config, overrides)
        check_config_file(args.config, cfg)
        finetune(cfg)
        return 0
    if args.command == "eval":
        from fastft.api import evaluate

        opts = _inference_options(args, extra)
        del opts["on_bad_file"]  # evaluation counts every file: a bad one is always an error
        evaluate(args.checkpoint, args.data, out_dir=args.out, print_report=True, overwrite=args.overwrite, **opts)
        return 0
    if args.command == "predict":
        from fastft.api import predict

        opts = _inference_options(args, extra)
        del opts["loader"], opts["precision"]  # predict always decodes with torchvision, at the checkpoint's precision
        out = predict(args.checkpoint, args.input, args.out, **opts)
        print(f"predictions written to {out}")
        return 0
    if extra:
        raise ConfigError(f"unrecognised argument {extra[0]!r}")
    if args.command == "export":
        from fastft.export import export_model

        for path in export_model(args.checkpoint, args.out, fmt=args.format, overwrite=args.overwrite):
            print(f"wrote {path}")
        return 0
    if args.command == "bench":
        from fastft.benchmark.cli import run_bench

        return run_bench(args)
    if args.command == "demo":
        from fastft.demo import run_demo, run_text_demo

        demo = run_text_demo if args.task == "text" else run_demo
        demo(out_dir=args.out_dir, data_dir=args.data_dir, epochs=args.epochs)
        return 0
    raise AssertionError(args.command)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    # An error raised in a DataLoader worker arrives wrapped with the worker's traceback; keep the original message.
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if last.startswith("fastft.errors.") else last
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except FastftError as e:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"fastft: error{where}: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fastft: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Errors from DataLoader workers are re-raised as their original type only when constructible; catch
        # the wrapped fastft ones here too.
        if "fastft.errors." in str(e):
            print(f"fastft: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if os.environ.get("WORLD_SIZE", "1") == "1":
            raise
        # A bug or a fault on one rank: keep the traceback, then say which rank failed and why in one line. The
        # launcher tears the other ranks down; ranks blocked in a collective fail when this process exits.
        traceback.print_exc()
        print(f"fastft: rank {os.environ.get('RANK')} failed: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m fastft.cli, as python -m fastft
    raise SystemExit(main())
