"""The DALI graph: decode, crop, resize and normalise on the CPU or the GPU, for one rank.

Training reads its batches from an `external_source` (the feed in dali_feed.py) that brings each planned batch's file
bytes and sample indices, and with augmentation each sample's crop window and flip; DALI decodes only that window
(`decoders.image_slice`) and resizes it. Evaluation reads its shard with `fn.readers.file` and resizes and
centre-crops as torchvision's eval preset does. Nothing in the graph draws at random.

DALI is imported only when a pipeline is built, so `import fastft` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastft.errors import ConfigError

_INSTALL_HINT = "NVIDIA DALI is not installed: pip install 'fastft[dali]' (nvidia-dali-cuda130)"
READER = "reader"  # the reader's name, which the DALI iterator queries for shard sizes and padding
# The preset's resize filter (torchvision InterpolationMode value) -> DALI's: both antialias when downscaling.
INTERP = {"bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}


def import_dali():
    """Returns (fn, types, Pipeline, DALIGenericIterator, LastBatchPolicy); raises ImportError with a hint."""
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return fn, types, Pipeline, DALIGenericIterator, LastBatchPolicy


@dataclass(frozen=True)
class GraphSpec:
    """What one rank's pipeline is built from (see `DaliLoader` for each field); checked when made.

    Raises:
        ConfigError: a value is invalid.
    """

    train: bool
    augment: bool
    batch_size: int
    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    shard_id: int
    num_shards: int
    threads: int
    prefetch: int
    seed: int
    device: str
    device_id: int | None
    hw_decoder_load: float

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and self.device_id is None:
            raise ConfigError("device='cuda' needs a device_id (the local CUDA device index)")
        if self.interpolation not in INTERP:
            raise ConfigError(f"interpolation must be one of {tuple(INTERP)}, got {self.interpolation!r}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ConfigError(f"shard_id must be in [0, {self.num_shards}), got {self.shard_id}")
        if min(self.batch_size, self.crop_size, self.resize_size, self.threads, self.prefetch) < 1:
            raise ConfigError("batch_size, crop_size, resize_size, threads and prefetch must be positive")
        if not (self.train and self.augment) and self.resize_size < self.crop_size:
            raise ConfigError(
                f"resize_size ({self.resize_size}) must be at least crop_size ({self.crop_size}) for evaluation"
            )

    @property
    def crops_in_feed(self) -> bool:
        """Training with augmentation: the feed brings each sample's crop window and flip."""
        return self.train and self.augment


def build_pipeline(g: GraphSpec, *, feed=None, paths: list[str] | None = None):
    """The pipeline for `g`: training reads from `feed` (a callable external source), evaluation the files `paths`.

    Outputs ("images" float32 CHW normalised, "index" int32 (1,): the sample's index in the list, which the loader
    maps to its target) per sample, on the GPU for device "cuda"."""
    fn, types, Pipeline, _, _ = import_dali()
    cuda = g.device == "cuda"
    pipe = Pipeline(
        batch_size=g.batch_size,
        num_threads=g.threads,
        device_id=g.device_id if cuda else None,  # a CPU pipeline with a device id needs CUDA
        seed=(g.seed * 1_000_003 + g.shard_id) % (2**31),
        prefetch_queue_depth=g.prefetch,
    )
    with pipe:
        decode = {"device": "mixed", "hw_decoder_load": g.hw_decoder_load} if cuda else {"device": "cpu"}
        if g.train:
            images, crop_pos_x, crop_pos_y, mirror, index = _train_images(g, feed, decode, fn, types)
        else:
            jpegs, index = _eval_reader(g, paths, fn)
            images, crop_pos_x, crop_pos_y = _resized_for_centre_crop(g, jpegs, decode, fn, types)
            mirror = 0
        if cuda:
            index = index.gpu()
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            crop=(g.crop_size, g.crop_size),
            crop_pos_x=crop_pos_x,
            crop_pos_y=crop_pos_y,
            mean=[255.0 * m for m in g.mean],
            std=[255.0 * s for s in g.std],
            mirror=mirror,
        )
        pipe.set_outputs(images, index)
    return pipe


def _train_images(g: GraphSpec, feed, decode: dict, fn, types):
    """The sampler's batches, in its order, from the feed: encoded bytes and sample indices, and with augmentation
    each sample's crop window (top, left), (height, width) and flip. Returns (images, crop_pos_x, crop_pos_y, mirror,
    index) for `crop_mirror_normalize`."""
    n = 5 if g.crops_in_feed else 2
    outputs = fn.external_source(
        source=feed,
        num_outputs=n,
        batch=True,
        dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32][:n],
        ndim=[1, 1, 1, 1, 0][:n],
    )
    jpegs, index = outputs[0], outputs[1]
    if not g.crops_in_feed:  # training without augmentation: the eval transform
        images, crop_pos_x, crop_pos_y = _resized_for_centre_crop(g, jpegs, decode, fn, types)
        return images, crop_pos_x, crop_pos_y, 0, index
    # Decode only the window (the rest of the JPEG is skipped), then resize it to the output size.
    _, _, anchor, shape, mirror = outputs
    images = fn.decoders.image_slice(
        jpegs,
        anchor,
        shape,
        axis_names="HW",
        normalized_anchor=False,
        normalized_shape=False,
        output_type=types.RGB,
        **decode,
    )
    images = fn.resize(
        images,
        resize_x=g.crop_size,
        resize_y=g.crop_size,
        interp_type=getattr(types, INTERP[g.interpolation]),  # antialiased when downscaling, like PIL's resize
    )
    return images, 0.5, 0.5, mirror, index  # the crop already has the output size


def _eval_reader(g: GraphSpec, paths: list[str], fn):
    """Evaluation: each rank keeps its own shard, padded to the largest one (the iterator trims the padding). The
    reader's one int label per file is the file's index in the list (the loader looks its target up)."""
    return fn.readers.file(
        files=paths,
        labels=list(range(len(paths))),
        name=READER,
        shard_id=g.shard_id,
        num_shards=g.num_shards,
        pad_last_batch=True,
        random_shuffle=False,
        stick_to_shard=True,
    )


def _resized_for_centre_crop(g: GraphSpec, jpegs, decode: dict, fn, types):
    """Decode, then resize + centre-crop placement computed exactly as torchvision's eval preset does it.

    torchvision's `Resize(s)` sets the shorter side to `s` and the longer to `int(s * long / short)`
    (DALI's `resize_shorter` rounds instead), and `CenterCrop` puts the crop at
    `int(round((size - crop) / 2))` with round-half-to-even (DALI rounds halves up). Either
    difference shifts the crop by a pixel, so both are computed here from the decoded shape.

    Returns:
        (resized images, crop_pos_x, crop_pos_y) for `crop_mirror_normalize`.
    """
    from nvidia.dali import math as dmath

    images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
    hw = images.shape(dtype=types.FLOAT)  # decoded images are HWC; the shape is read on the CPU
    h, w = hw[0], hw[1]
    short = dmath.min(h, w)
    new_h = dmath.floor(g.resize_size * h / short)
    new_w = dmath.floor(g.resize_size * w / short)
    images = fn.resize(
        images,
        resize_y=new_h,
        resize_x=new_w,
        interp_type=getattr(types, INTERP[g.interpolation]),  # antialiased when downscaling, like PIL's resize
    )

    def centre(extent):
        slack = extent - g.crop_size
        half = dmath.floor(slack / 2)
        odd_slack = slack - 2 * half  # 1 when the centre falls on a half pixel
        odd_half = half - 2 * dmath.floor(half / 2)
        anchor = half + odd_slack * odd_half  # round half to even, like Python's round()
        return anchor / dmath.max(slack, 1.0)  # crop_pos is relative to the slack

    return images, centre(new_w), centre(new_h)
