"""The results document: its schema and check, and its markdown renderings (full results and the README's section)."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path

from fastft.benchmark.measure import BREAKDOWN
from fastft.benchmark.probe_wall import render as probe_wall_render
from fastft.benchmark.save_gap import render as save_gap_render

SCHEMA_VERSION = 1


REQUIRED_KEYS = {
    "document": (
        "schema_version",
        "benchmark",
        "run_id",
        "suite",
        "date",
        "command",
        "hardware",
        "versions",
        "settings",
        "limit_measurements",
        "limits",
        "baselines",
        "cases",
        "headline",
        "targets",
        "wall_s",
    ),
    "hardware": ("hostname", "cpu_model", "cpu_count", "cores_available", "gpu_model", "gpu_count", "device"),
    "limit": (
        "key",
        "run_id",
        "model",
        "precision",
        "batch_size",
        "image_size",
        "images_per_s",
        "spread",
        "repeats_images_per_s",
        "warmup_iters",
        "iters_per_repeat",
    ),
    "limit_measurement": ("id", "when", "key", "run_id", "images_per_s", "repeats_images_per_s"),
    "baseline": ("model", "run_id", "images_per_s", "spread", "epochs_images_per_s", "warmup_epochs", "total_s"),
    "case": ("name", "status", "config"),
    "case_ok": (
        "run_id",
        "precision",
        "compile_target",
        "images_per_s",
        "spread",
        "epochs_images_per_s",
        "first_epoch_images_per_s",
        "warmup_epochs",
        "breakdown_ms_per_step",
        "limit_key",
        "limit_ids",
        "limit_images_per_s",
        "ratio_to_limit",
        "ratio_to_baseline",
        "wall_s",
    ),
    "target": ("name", "description", "threshold", "value", "met"),
    "headline": (
        "model",
        "epochs",
        "train_images",
        "val_images",
        "batch_size",
        "image_size",
        "first_epochs",
        "fastft_cached",
        "baseline",
        "time_ratio_fastft_over_baseline",
    ),
    "timm": ("run_id", "model", "timm_model", "pairs", "precision", "batch_size", "image_size", "modes"),
    "row": ("status", "model"),
    "probe_wall_ok": (
        "run_id",
        "epochs",
        "images",
        "batch_size",
        "workers",
        "image_size",
        "precision",
        "device",
        "forward_pass_s",
        "probe_wall_s",
        "ratios",
        "ratio_median",
        "target",
        "met",
        "breakdown_s",
    ),
    "save_gap_ok": (
        "run_id",
        "steps",
        "every",
        "batch_size",
        "image_size",
        "precision",
        "device",
        "sync",
        "background",
        "ratio",
        "ratio_sync",
        "target",
        "met",
    ),
    "save_gap_mode": ("normal_median_s", "normal_s", "at_save_s", "at_save_median_s", "ratio_at_save"),
    "first_epoch": (
        "name",
        "run_id",
        "loader",
        "image_size",
        "images_per_s",
        "spread",
        "repeats",
        "limit_key",
        "limit_ids",
        "limit_images_per_s",
        "ratio_to_limit",
        "breakdown_s",
    ),
}


def validate(doc: dict) -> None:
    """Raise ValueError when the document does not follow the schema (version and required keys)."""

    def need(obj: dict, kind: str, where: str) -> None:
        missing = [k for k in REQUIRED_KEYS[kind] if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")

    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"schema_version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    need(doc, "document", "document")
    need(doc["hardware"], "hardware", "hardware")
    for i, m in enumerate(doc["limit_measurements"]):
        need(m, "limit_measurement", f"limit_measurements[{i}]")
    for i, lim in enumerate(doc["limits"]):
        need(lim, "limit", f"limits[{i}]")
    for i, b in enumerate(doc["baselines"]):
        need(b, "baseline", f"baselines[{i}]")
    for i, c in enumerate(doc["cases"]):
        need(c, "case", f"cases[{i}]")
        if c["status"] == "ok":
            need(c, "case_ok", f"cases[{i}] ({c['name']})")
    for i, t in enumerate(doc["targets"]):
        need(t, "target", f"targets[{i}]")
    if doc.get("timm"):
        need(doc["timm"], "timm", "timm")
    for key in ("probe_wall", "save_gap"):
        row = doc.get(key)
        if row:
            need(row, "row", key)
            if row["status"] == "ok":
                need(row, f"{key}_ok", key)
    if (doc.get("save_gap") or {}).get("status") == "ok":
        for mode in ("sync", "background"):
            need(doc["save_gap"][mode], "save_gap_mode", f"save_gap.{mode}")
    if doc["headline"] is not None:
        need(doc["headline"], "headline", "headline")
        for i, f in enumerate(doc["headline"]["first_epochs"]):
            need(f, "first_epoch", f"headline.first_epochs[{i}]")


def _f(v: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{fmt}}{suffix}"


def _mode_cells(c: dict) -> str:
    cfg = c["config"]
    compile_ = c.get("compile_target", cfg["compile"])
    return (
        f"| {cfg['model']} | {cfg['mode']} | {cfg['loader']} | {c.get('precision', cfg['precision'])} | "
        f"{compile_} | {'on' if cfg['channels_last'] else 'off'} | {cfg['cache']} | {cfg['world']} |"
    )


def render_cases(doc: dict) -> list[str]:
    head = [
        (
            "| model | mode | input | precision | compile | channels_last | cache | world | img/s | spread | "
            "data | frozen | trainable | optimizer | comm | other | x limit | x baseline |"
        ),
        "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = []
    for c in doc["cases"]:
        if c["status"] != "ok":
            rows.append(f"{_mode_cells(c)} {c['status']}: {c.get('reason', '')} |" + " |" * 9)
            continue
        b = c["breakdown_ms_per_step"]
        rows.append(
            f"{_mode_cells(c)} {c['images_per_s']:.1f} | {c['spread']['min']:.1f} - {c['spread']['max']:.1f} | "
            + " | ".join(f"{b[k]:.0f}" for k in BREAKDOWN)
            + f" | {limit_cell(c)} | {_f(c['ratio_to_baseline'], '.2f')} |"
        )
    return head + rows


CACHED_NOTE = (
    "cached modes (trained from the feature cache, the backbone never runs) against what bounds them "
    "instead: feature bytes read per second / the host memcpy bandwidth of the same run"
)


def limit_cell(c: dict) -> str:
    """`x limit` of a mode: its fraction of the backbone's forward-only limit; for a cached mode, its feature bytes per
    second against the host memcpy bandwidth (n/a in documents from before that was measured)."""
    if c["config"]["cache"] == "off":
        return _f(c["ratio_to_limit"], ".2f")
    if c.get("ratio_to_memcpy") is None:
        return "n/a (cached; run without memcpy)"
    return f"{c['cache_bytes_per_s'] / 1e6:.2f} MB/s = {c['ratio_to_memcpy']:.2g} x memcpy"


def render_memcpy(doc: dict) -> list[str]:
    m = doc.get("memcpy")
    if not m:
        return []
    return [
        "",
        "## Host memory bandwidth (what bounds the cached modes)",
        "",
        (
            f"{m['bytes_per_s'] / 1e9:.2f} GB/s ({m['spread']['min'] / 1e9:.2f} - {m['spread']['max'] / 1e9:.2f}; "
            f"median of {len(m['repeats_bytes_per_s'])} copies of {m['buffer_bytes'] >> 20} MiB, {m['method']}, "
            f"{m['threads']} threads; bytes copied per second, each read once and written once)."
        ),
    ]


def render_markdown(doc: dict) -> str:
    hw, v, s = doc["hardware"], doc["versions"], doc["settings"]
    gpu = f"{hw['gpu_count']} x {hw['gpu_model']}" if hw["gpu_count"] else "no GPU"
    lines = [
        f"# fastft throughput: suite `{doc['suite']}`, {doc['date']}",
        "",
        f"`{doc['command']}` (run `{doc['run_id']}`, {doc['wall_s']:.0f} s)",
        "",
        *(
            ["**Interrupted before the end: only the modes listed were measured.**", ""]
            if doc.get("interrupted")
            else []
        ),
        (
            f"Hardware: {hw['cpu_model']}, {hw['cores_available']} of {hw['cpu_count']} cores "
            f"(native bf16: {hw['cpu_native_bf16']}), {gpu}; device `{hw['device']}`; load average "
            f"{hw['load_avg_start'][0]:.1f} at start, {hw.get('load_avg_end', [0])[0]:.1f} at end."
        ),
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        (
            f"Settings: batch {s['batch_size']}, crop {s['image_size'] or 'preset'} px, {s['workers']} data workers; "
            f"modes on {s['train_images']} train / {s['val_images']} val JPEGs, {s['warmup_epochs']} warm-up epoch + "
            f"{s['repeats']} timed epochs each (median, spread = min - max of the timed epochs); ms per step by "
            "segment (median); `comm` = standalone all-reduce of the trainable gradients (overlapped inside "
            "`trainable` in the real step); x limit = / forward-only images/s at the same model, precision and batch; "
            f"{CACHED_NOTE}; x baseline = / the seed loop's images/s (same JPEGs, batch; fp32, train-mode "
            "backbone)."
        ),
        "",
    ]
    lines += [f"Note: {n}" for n in s.get("notes", [])] + [""] if s.get("notes") else []
    lines += [
        "## Modes",
        "",
        *render_cases(doc),
        "",
        ("## Limits (forward only, in-memory synthetic batch, channels_last, inference_mode)"),
        "",
        "| key | img/s | spread | repeats |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {lim['key']} | {lim['images_per_s']:.1f} | {lim['spread']['min']:.1f} - {lim['spread']['max']:.1f} | "
        f"{len(lim['repeats_images_per_s'])} x {lim['iters_per_repeat']} batches |"
        for lim in doc["limits"]
    ]
    lines += render_memcpy(doc)
    lines += [
        "",
        "## Seed baseline (fastft.benchmark.baseline)",
        "",
        "| model | img/s | spread | epochs | source |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {b['model']} | {b['images_per_s']:.1f} | {b['spread']['min']:.1f} - {b['spread']['max']:.1f} | "
        f"{len(b['epochs_images_per_s'])} ({b['warmup_epochs']} warm-up) | {b['source']} |"
        for b in doc["baselines"]
    ]
    lines += ["", *render_headline(doc), "", *render_timm(doc), *render_probe_wall(doc), *render_save_gap(doc)]
    lines += [*render_targets(doc), ""]
    return "\n".join(lines)


def render_timm(doc: dict) -> list[str]:
    """The timm comparison (fastft.benchmark.timm_compare), when the run made it."""
    t = doc.get("timm")
    if not t:
        return []
    lines = [
        "## fastft against a timm-style loop",
        "",
        (
            f"{t['model']} (timm `{t['timm_model']}`), {t['image_size']} px, batch {t['batch_size']}, "
            f"{t['workers']} workers, {t['precision']}, channels_last, no compile, SGD; {t['train_images']} train "
            f"JPEGs, {t['epochs']} epochs per run (the last timed); partial = `{t['partial_freeze']}`; {t['pairs']} "
            "alternated pairs per mode. timm's side: train.py's loop from timm's own pieces (create_model, "
            "create_dataset/create_loader, create_optimizer_v2, create_scheduler_v2, utils.freeze)."
        ),
        "",
        "| mode | fastft img/s | timm img/s | fastft / timm (each pair) | median |",
        "|---|---|---|---|---:|",
    ]
    for mode, m in t["modes"].items():
        each = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
        lines.append(
            f"| {mode} | {each(m['fastft_images_per_s'])} | {each(m['timm_images_per_s'])} | "
            f"{', '.join(f'{r:.2f}' for r in m['ratios'])} | {m['ratio_median']:.2f} |"
        )
    return [*lines, ""]


def _row_section(entry: dict | None, title: str, body: Callable[[dict], list[str]]) -> list[str]:
    """A side-by-side row's section: nothing when the suite has no such row, its status and reason when it did not
    run, else `body(entry)`."""
    if not entry:
        return []
    if entry["status"] != "ok":
        return [title, "", f"{entry['status']}: {entry['reason']}", ""]
    return [title, "", *body(entry), ""]


def render_probe_wall(doc: dict) -> list[str]:
    """The cached probe against one forward pass (fastft.benchmark.probe_wall), when the suite has the row."""
    p = doc.get("probe_wall")
    title = f"## A {(p or {}).get('epochs', 'N')}-epoch cached linear probe against one forward pass over the data"

    def body(p: dict) -> list[str]:
        return [
            (
                f"{p['model']} (random weights from a file), `model.freeze=backbone`, `features.cache=memory`, "
                f"{p['epochs']} epochs, defaults otherwise (checkpoint every epoch, TensorBoard, report.html, "
                f"exports), `finetune` in-process (no Python start-up or imports); {p['images']} JPEGs "
                f"({p['train_images']} train + {p['val_images']} val), {p['image_size']} px crops, batch "
                f"{p['batch_size']}, {p['workers']} workers, {p['precision']} on `{p['device']}`. One forward pass: "
                "a plain torchvision loop (ImageFolder, the preset's resize + centre crop, DataLoader with the same "
                "batch and workers) decoding every image once and running the backbone in inference mode, "
                "channels_last. Each side warmed first (a forward pass over the data; a 1-epoch probe on 8 + 4 "
                "other JPEGs, which pays the run's imports and first uses). Alternated pairs; the median ratio."
            ),
            "",
            *probe_wall_render(p),
        ]

    return _row_section(p, title, body)


def render_save_gap(doc: dict) -> list[str]:
    """The step time around a checkpoint save (fastft.benchmark.save_gap), when the suite has the row."""

    def body(g: dict) -> list[str]:
        return [
            (
                f"{g['model']} full fine-tune (random weights), {g['optim']}, {g['precision']} on `{g['device']}`, "
                f"{g['image_size']} px, batch {g['batch_size']}, {g['workers']} workers, {g['loader']} input; "
                f"{g['steps']} optimizer steps, `checkpoint.every_steps = {g['every']}`. A step's time: the interval "
                "between two calls of the loop's `after_step` (which holds the save; on a GPU synchronised first); "
                '"at a save": the interval that starts at a save step; normal: the others, less the step after a '
                "save and the first two. sync: the file written on the training thread; background: by the writer "
                "thread (fastft's default)."
            ),
            "",
            *save_gap_render(g),
            "",
            (
                f"**Step at a save / normal step, background write: {g['ratio']:.2f}** (sync write: "
                f"{g['ratio_sync']:.2f}; target <= {g['target']}: {'met' if g['met'] else 'missed'})."
            ),
        ]

    return _row_section(doc.get("save_gap"), "## Step time around a checkpoint save", body)


def render_headline(doc: dict) -> list[str]:
    h = doc["headline"]
    if not h:
        return ["## Side by side", "", "not run in this suite"]
    f, b = h["fastft_cached"], h["baseline"]
    walls = " and ".join(f"{r['wall_s']:.1f} s" for r in f["runs"])
    lines = [
        (
            f"## Side by side: {h['epochs']}-epoch linear probe of {h['model']} on {h['train_images']} train + "
            f"{h['val_images']} val JPEGs, batch {h['batch_size']}, {h['image_size']} px, {h['workers']} workers"
        ),
        "",
        "| run | wall time | cache build | epochs | rest (model build, eval, writes) | val top-1 |",
        "|---|---:|---:|---:|---:|---:|",
        (
            f"| seed loop (fp32, no cache) | {b['wall_s']:.1f} s | - | {b['epochs_s']:.1f} s | "
            f"{b['wall_s'] - b['epochs_s']:.1f} s | {_f(b['top1'], '.3f')} |"
        ),
        (
            f"| fastft, memory cache ({f['precision']}), mean of the runs before and after the seed loop "
            f"({walls}) | {f['wall_s']:.1f} s | {_f(f['cache_build_s'], '.1f', ' s')} | {f['epochs_s']:.2f} s | "
            f"{f['rest_s']:.1f} s | {_f(f['top1'], '.3f')} |"
        ),
        "",
        (
            f"**fastft / seed loop wall time = {h['time_ratio_fastft_over_baseline']:.3f} "
            f"(1/{1 / h['time_ratio_fastft_over_baseline']:.1f})**"
        ),
        "",
        (
            "Linear probe, first epoch without cache (fresh run: new model, loader and workers), against the "
            "forward-only limit measured just before and after each run; median of the repeats, x limit = median "
            "of the per-run ratios (min - max):"
        ),
        "",
        "| input | crop | runs | img/s | limit img/s | x limit | data | frozen | trainable + optimizer | other "
        "| run wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in h["first_epochs"]:
        bd, wall = e["breakdown_s"], e["wall_s"]
        pct = {k: 100 * v / wall for k, v in bd.items()}
        rs = e.get("ratio_spread") or {}
        lines.append(
            f"| {e['resolved_loader']} | {e['image_size']} px | {len(e['repeats'])} | "
            f"{e['images_per_s']:.1f} | {_f(e['limit_images_per_s'])} | **{_f(e['ratio_to_limit'], '.2f')}** "
            f"({_f(rs.get('min'), '.2f')} - {_f(rs.get('max'), '.2f')}) | {pct['data']:.0f}% | "
            f"{pct['frozen']:.0f}% | {pct['trainable'] + pct['optimizer']:.0f}% | "
            f"{max(0.0, 100 - sum(pct.values())):.0f}% | "
            f"{statistics.median(r['run_wall_s'] for r in e['repeats']):.1f} s |"
        )
    steps = h["train_images"] // h["batch_size"]
    ahead = min(steps, 4 * h["workers"]) if h["workers"] else 0
    lines += [
        "",
        (
            f"fastft starts the first epoch's loading before it builds the model, so up to {ahead} of the "
            f"epoch's {steps} batches ({h['workers']} workers x 4 prefetched; DALI: its prefetch queue) are "
            "decoded during set-up, outside the epoch timer but inside the run's wall time. An epoch much "
            "longer than that tends to the steady-state ratio of the same input in the modes table."
        ),
        "",
        "Random pixel content makes top-1 meaningless here: the task is timing.",
    ]
    return lines


def render_targets(doc: dict) -> list[str]:
    out = ["## Targets", ""]
    for t in doc["targets"]:
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        out.append(
            f"- **{state}**: {t['description']}: {_f(t['value'], '.3f')} (target {t['threshold']})"
            + (f". Why: {t['why']}" if t.get("why") else "")
        )
    return out


def render_latest(doc: dict, md_name: str) -> str:
    """The README's benchmark section: the latest table with ratios to the baseline and to the limit."""
    hw = doc["hardware"]
    where = (
        f"{hw['gpu_count']} x {hw['gpu_model']}"
        if hw["gpu_count"]
        else f"{hw['cpu_model']}, {hw['cores_available']} cores"
    )
    lines = [
        f"### Throughput ({where}, {doc['date'][:10]}, suite `{doc['suite']}`)",
        "",
        (
            f"Measured by `make bench`; full results, per-step breakdown and versions: "
            f"[benchmarks/results/{md_name}](benchmarks/results/{md_name}). x limit: fraction of the forward-only "
            f"images/s of the same backbone at the same batch and precision; {CACHED_NOTE}; x baseline: multiple "
            "of the naive seed loop (fp32, frozen by requires_grad only) on the same JPEGs."
        ),
        "",
        "| model | mode | input | precision | cache | img/s | x limit | x baseline |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        if (
            c["status"] == "ok"
            and c["config"]["world"] == 1
            and c["config"]["channels_last"]
            and c["config"]["compile"] == "none"
            and c["config"]["precision"] == "auto"
        ):
            cfg = c["config"]
            lines.append(
                f"| {cfg['model']} | {cfg['mode']} | {cfg['loader']} | {c['precision']} | {cfg['cache']} | "
                f"{c['images_per_s']:.1f} | {limit_cell(c)} | "
                f"{_f(c['ratio_to_baseline'], '.2f')} |"
            )
    head = render_headline(doc)
    lines += ["", "#### " + head[0].removeprefix("## "), *head[1:], "", *render_targets(doc)[2:], ""]
    return "\n".join(lines)


def write_results(doc: dict, out_dir: Path, *, latest: bool = True) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{hardware_slug(doc['hardware'])}-{doc['date'][:10].replace('-', '')}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(render_markdown(doc))
    if latest:
        (out_dir / "LATEST.md").write_text(render_latest(doc, md_path.name))
    return json_path, md_path


def hardware_slug(hw: dict) -> str:
    gpu, cpu = f"{hw['gpu_model']}-{hw['gpu_count']}gpu", f"{hw['cpu_model']}-{hw['cores_available']}c"
    base = gpu if hw["gpu_count"] else cpu
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
