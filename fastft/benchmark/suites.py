"""What a suite measures (cases, settings, the side-by-side run) and the registry `fastft bench --suite` reads.

The built-in suites are `smoke` (seconds, for the harness's own tests), `cpu` (a 2-core machine, < 15 min) and `gpu`
(one GPU, < 8 min). A project adds its own with `register_suite(name)(factory)`; nothing heavy is imported here, so
the CLI can list the names without loading torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

FREEZE = {"linear": "backbone", "partial": None, "full": "none"}  # partial: Settings.partial_freeze


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    mode: str = "linear"  # linear | partial | full
    loader: str = "synthetic"  # synthetic (in memory) | torch | dali
    precision: str = "auto"  # fastft precision.dtype
    compile: str = "none"  # fastft compile.target: none | head | all
    channels_last: bool = True
    cache: str = "off"  # off | memory
    world: int = 1


@dataclass
class Settings:
    batch_size: int
    image_size: int  # 0 = the weights' preset crop
    workers: int
    train_images: int  # the modes' data: photo-like JPEGs (fastft.benchmark.data), root/train + root/val
    val_images: int
    warmup_epochs: int = 1
    repeats: int = 3  # timed epochs per mode
    limit_warmup: int = 2
    limit_iters: int = 2  # batches per limit repeat
    limit_repeats: int = 3
    limit_first_warmup_s: float = 5.0  # extra warm-up (seconds) for the first limit measurement of each key
    device: str = "auto"
    partial_freeze: str = "until:layer3"


@dataclass
class Block:
    model: str
    cases: list[Case]
    baseline_epochs: int = 0  # > 0: time the seed loop for this many epochs (first = warm-up); 0: take the headline's


@dataclass
class Headline:
    """The side-by-side run: the linear probe's first epoch vs the limit, and a cached N-epoch linear probe vs the
    seed loop (wall time of the whole call, cache build and final evaluation included) on the same JPEGs."""

    model: str
    epochs: int
    train_images: int
    val_images: int
    preset_first_epoch: bool = True  # also time a first epoch at the weights' preset size when the suite uses another
    first_epoch_repeats: int = 5
    dali_first_epoch: bool = True  # also time the first epoch on DALI when installed and `auto` picks another loader


@dataclass
class TimmComparison:
    """Full and partial fine-tune img/s, fastft against a timm-style loop (fastft.benchmark.timm_compare), on the
    suite's workers and image size (and batch, unless `batch_size`), `pairs` alternated runs per mode, `epochs` per run
    (the last is timed)."""

    model: str = "resnet50"  # torchvision name (fastft's side)
    timm_model: str = "resnet50"  # the same architecture in timm
    modes: tuple[str, ...] = ("full", "partial")
    pairs: int = 3
    epochs: int = 2
    train_images: int = 96
    val_images: int = 16
    precision: str = "auto"
    batch_size: int = 0  # 0: the suite's


@dataclass
class ProbeWall:
    """A cached linear probe's wall time against one forward pass of its backbone over the same JPEGs
    (fastft.benchmark.probe_wall): `pairs` alternated (forward pass, probe) pairs, the median ratio (target <= 1.2).
    batch_size 0 / workers None: the suite's; `estimate_s`: what the row takes, so a time budget skips it rather
    than cut it."""

    model: str = "resnet50"
    epochs: int = 10
    train_images: int = 320
    val_images: int = 80
    image_size: int = 224  # 0: the weights' preset crop
    batch_size: int = 0
    workers: int | None = None
    pairs: int = 3
    precision: str = "auto"
    estimate_s: float = 120.0


@dataclass
class SaveGap:
    """The step time around a checkpoint save, the file written on the training thread vs by the writer thread
    (fastft.benchmark.save_gap): a full fine-tune of `steps` optimizer steps saving every `every` (target: a step at
    a save <= 1.1 x a normal step, background write). `train_images` >= steps x batch keeps the run in one epoch.
    image_size / batch_size 0 and workers None: the suite's."""

    model: str = "resnet50"
    steps: int = 16
    every: int = 4
    image_size: int = 64
    batch_size: int = 8
    workers: int | None = 0
    loader: str = "torch"  # torch (JPEGs) | synthetic (in-memory batches: the step without decode)
    precision: str = "fp32"
    optim: str = "adamw"
    train_images: int = 128
    estimate_s: float = 120.0


@dataclass
class Suite:
    name: str
    settings: Settings
    blocks: list[Block]
    headline: Headline | None = None
    timm: TimmComparison | None = None
    probe_wall: ProbeWall | None = None
    save_gap: SaveGap | None = None
    notes: list[str] = field(default_factory=list)


SUITES: dict[str, Callable[[], Suite]] = {}


def register_suite(name: str) -> Callable[[Callable[[], Suite]], Callable[[], Suite]]:
    """Decorator: make `factory()` the suite `fastft bench --suite NAME` runs (a fresh Suite per call)."""

    def add(factory: Callable[[], Suite]) -> Callable[[], Suite]:
        SUITES[name] = factory
        return factory

    return add


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        from fastft.errors import ConfigError

        raise ConfigError(f"--suite {name!r}: unknown suite (known: {', '.join(sorted(SUITES))})")
    return SUITES[name]()


def _lp(model: str, **kw) -> list[Case]:
    return [
        Case(f"linear/{k}", model, **v, **kw)
        for k, v in (
            ("synthetic", {}),
            ("torchvision", {"loader": "torch"}),
            ("dali", {"loader": "dali"}),
            ("cache", {"loader": "torch", "cache": "memory"}),
        )
    ]


@register_suite("cpu")
def cpu_suite() -> Suite:
    r18 = [
        *_lp("resnet18"),
        Case("partial/synthetic", "resnet18", "partial"),
        Case("full/synthetic", "resnet18", "full"),
        Case("linear/synthetic fp32", "resnet18", precision="fp32"),
        Case("linear/synthetic compile head", "resnet18", compile="head"),
        Case("linear/synthetic NCHW", "resnet18", channels_last=False),
        Case("linear/synthetic world 2", "resnet18", world=2),
    ]
    r50 = [
        *_lp("resnet50"),
        Case("partial/synthetic", "resnet50", "partial"),
        Case("full/synthetic", "resnet50", "full"),
    ]
    return Suite(
        "cpu",
        Settings(batch_size=32, image_size=128, workers=2, train_images=96, val_images=32, device="cpu"),
        [Block("resnet18", r18, baseline_epochs=4), Block("resnet50", r50)],
        Headline("resnet50", epochs=10, train_images=224, val_images=32),
        # Batch 8, 8 steps per epoch (a per-epoch cost such as loader start-up must not dominate): 12 resnet50 runs
        # (3 pairs x 2 modes) in about 5 minutes on 2 idle cores.
        timm=TimmComparison(train_images=64, val_images=4, batch_size=8),
        # benchmarks/probe_wall.py's and save_gap.py's settings: 224 px, batch 32, 2 workers, 3 pairs; a resnet50
        # full fine-tune at 64 px, batch 8, AdamW, fp32, saving every 4 of 16 steps.
        probe_wall=ProbeWall(batch_size=32, workers=2),
        save_gap=SaveGap(),
        notes=[
            (
                "128 px crops (not 224) so that the suite, the 10-epoch fp32 seed loop included, fits in "
                "15 minutes on 2 cores; every ratio compares like with like at that size."
            )
        ],
    )


@register_suite("gpu")
def gpu_suite() -> Suite:
    # Compiled modes last: their compile time is the one cost that can run into the time budget.
    cases = [
        Case("linear/synthetic", "resnet50", precision="bf16"),
        Case("linear/dali", "resnet50", loader="dali", precision="bf16"),
        Case("linear/torchvision", "resnet50", loader="torch", precision="bf16"),
        Case("linear/cache", "resnet50", loader="dali", precision="bf16", cache="memory"),
        Case("partial/synthetic", "resnet50", "partial", precision="bf16"),
        Case("full/synthetic", "resnet50", "full", precision="bf16"),
        Case("full/dali", "resnet50", "full", loader="dali", precision="bf16"),
        Case("linear/synthetic compile all", "resnet50", precision="bf16", compile="all"),
        Case("full/synthetic compile head", "resnet50", "full", precision="bf16", compile="head"),
    ]
    workers = max(1, min(16, len(os.sched_getaffinity(0)) - 1))
    return Suite(
        "gpu",
        Settings(
            batch_size=256,
            image_size=0,
            workers=workers,
            train_images=4096,
            val_images=512,
            limit_warmup=5,
            limit_iters=10,
            limit_first_warmup_s=3.0,
            device="cuda",
        ),
        [Block("resnet50", cases, baseline_epochs=3)],
        Headline("resnet50", epochs=10, train_images=4096, val_images=512),
        # Before the timm comparison (the one row without an estimate): each starts only when its estimate fits in
        # the time budget, and is recorded as skipped otherwise.
        probe_wall=ProbeWall(train_images=4096, val_images=512, image_size=0, pairs=2, estimate_s=60.0),
        save_gap=SaveGap(
            image_size=0,
            batch_size=0,
            workers=None,
            loader="synthetic",
            precision="bf16",
            train_images=4096,
            estimate_s=45.0,
        ),
        timm=TimmComparison(train_images=2048, val_images=256, epochs=3),
    )


@register_suite("smoke")
def smoke_suite() -> Suite:
    return Suite(
        "smoke",
        Settings(
            batch_size=8,
            image_size=32,
            workers=0,
            train_images=16,
            val_images=8,
            limit_warmup=1,
            limit_iters=1,
            limit_first_warmup_s=0.0,
            device="cpu",
        ),
        [
            Block(
                "resnet18",
                [
                    Case("linear/synthetic", "resnet18"),
                    Case("linear/cache", "resnet18", loader="torch", cache="memory"),
                ],
                baseline_epochs=3,
            )
        ],
        Headline(
            "resnet18",
            epochs=3,
            train_images=16,
            val_images=8,
            preset_first_epoch=False,
            first_epoch_repeats=1,
            dali_first_epoch=False,
        ),
        # The smallest rows that still have a normal step and two saves: 7 steps saving every 3.
        probe_wall=ProbeWall("resnet18", epochs=2, train_images=8, val_images=4, image_size=32, pairs=1, estimate_s=10),
        save_gap=SaveGap(
            "resnet18", steps=7, every=3, image_size=32, batch_size=2, optim="sgd", train_images=14, estimate_s=10
        ),
    )
