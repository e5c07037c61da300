"""Deterministic procedural image datasets for the demo, the tests and the benchmarks.

Every class is a shape or a texture drawn from a coverage mask; colours, position, scale, rotation and noise are
random for every image, so the classes differ by shape alone. Each image has its own numpy Generator seeded from
(seed, class, split, index), so the same arguments always give byte-identical files.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASS_NAMES: tuple[str, ...] = (
    "checker",
    "circle",
    "cross",
    "diamond",
    "dots",
    "hstripes",
    "ring",
    "square",
    "triangle",
    "vstripes",
)

MANIFEST_NAME = ".fastft_synthetic.json"
# Bump when the drawing code changes, so caches made by an older generator are regenerated.
_GENERATOR_VERSION = 1
_SPLITS = ("train", "val")
_LAYOUTS = ("split", "flat")
_FORMATS = ("jpg", "png")


def make_image_folder(
    root: str | Path,
    *,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 15,
    image_size: int = 64,
    seed: int = 0,
    layout: str = "split",
    fmt: str = "jpg",
    quality: int = 90,
) -> Path:
    """Generate (or reuse) the dataset; returns root.

    layout="split" writes root/train/<cls>/ and root/val/<cls>/; layout="flat" writes root/<cls>/ with
    train_per_class + val_per_class images per class (the train images followed by the val images).
    A manifest written last records the arguments and files: a complete dataset with the same arguments is reused,
    one with other arguments has its files removed (only those) and is regenerated.

    Raises:
        ValueError: an argument is out of range; the message names it and its value.
    """
    _check_num_classes(num_classes)
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if train_per_class + val_per_class < 1:
        raise ValueError("train_per_class + val_per_class must be >= 1, got 0")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")

    root = Path(root)
    args = {
        "version": _GENERATOR_VERSION,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "image_size": image_size,
        "seed": seed,
        "layout": layout,
        "fmt": fmt,
        "quality": quality,
    }
    plan = _plan(args)
    files = [rel for rel, *_ in plan]

    manifest_path = root / MANIFEST_NAME
    old = _read_manifest(manifest_path)
    if old is not None:
        if old.get("args") == args and old.get("files") == files and all((root / rel).is_file() for rel in files):
            return root
        # Drop the manifest before touching files: if we are interrupted from here on, no manifest means redo.
        manifest_path.unlink()
        if old.get("args") != args:
            _remove_files(root, old.get("files", []))

    root.mkdir(parents=True, exist_ok=True)
    for rel, cls_idx, split_idx, idx in plan:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, cls_idx, split_idx, idx])
        img = Image.fromarray(render(CLASS_NAMES[cls_idx], image_size, rng))
        if fmt == "jpg":
            img.save(path, format="JPEG", quality=quality)
        else:
            img.save(path, format="PNG")

    # Written last and atomically: its presence means every file above is complete.
    tmp = manifest_path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps({"args": args, "count": len(files), "files": files}, indent=1))
    os.replace(tmp, manifest_path)
    return root


def synthetic_batch(
    batch_size: int,
    *,
    image_size: int = 224,
    num_classes: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-memory normalised random images (B,3,H,W) and int64 labels (B,) for throughput benchmarks.

    Pixels are standard normal, i.e. what an ImageNet-normalised image roughly looks like to the model.
    Unlike make_image_folder, num_classes is not bounded by CLASS_NAMES (benchmarks may use 1000).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    # Drawn in float32 and cast, so every dtype sees the same values.
    images = torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(dtype)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen, dtype=torch.int64)
    return images, labels


def render(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one image of class `cls` as a (size, size, 3) uint8 array."""
    mask = _mask(cls, size, rng)[..., None]
    bg_base, fg_base = _contrasting_colours(rng)
    bg = _shaded(bg_base, size, rng)
    fg = _shaded(fg_base, size, rng)
    img = bg * (1.0 - mask) + fg * mask
    img += rng.normal(0.0, rng.uniform(2.0, 8.0), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _check_num_classes(num_classes: int) -> None:
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be between 2 and {len(CLASS_NAMES)}, got {num_classes}")


def _plan(args: dict) -> list[tuple[str, int, int, int]]:
    """(relative path, class index, split index, image index within split) for every file to write."""
    ext, ntr, nva = args["fmt"], args["train_per_class"], args["val_per_class"]
    plan = []
    for c in range(args["num_classes"]):
        name = CLASS_NAMES[c]
        if args["layout"] == "split":
            for s, (split, n) in enumerate(zip(_SPLITS, (ntr, nva), strict=True)):
                plan += [(f"{split}/{name}/{name}_{i:04d}.{ext}", c, s, i) for i in range(n)]
        else:
            # Same seeds as the split layout, so a flat folder holds exactly the train and val images.
            plan += [(f"{name}/{name}_{i:04d}.{ext}", c, 0, i) for i in range(ntr)]
            plan += [(f"{name}/{name}_{ntr + i:04d}.{ext}", c, 1, i) for i in range(nva)]
    return sorted(plan)


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_files(root: Path, files: list[str]) -> None:
    """Remove files a previous run made, then the folders that this leaves empty; never touch anything else."""
    base = root.resolve()
    dirs = set()
    for rel in files:
        path = (root / rel).resolve()
        if not path.is_relative_to(base) or path == base:
            continue  # a hand-edited manifest must not make us delete outside root
        path.unlink(missing_ok=True)
        dirs.update(p for p in path.parents if p != base and p.is_relative_to(base))
    # Deepest first; an empty class folder left behind would be an empty class to ImageFolder.
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass  # not empty: holds files we did not make


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground RGB drawn from the same distribution (so colour says nothing of the class)."""
    lum = np.array([0.299, 0.587, 0.114])
    while True:
        bg, fg = rng.uniform(0, 255, (2, 3))
        # A visible shape needs some luminance contrast; either may be the brighter one.
        if abs(float((fg - bg) @ lum)) >= 45:
            return bg.astype(np.float32), fg.astype(np.float32)


def _shaded(colour: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A colour with a gentle linear gradient across the image, like uneven lighting."""
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    delta = rng.uniform(-35, 35, 3).astype(np.float32)
    return colour + ramp[..., None] * delta


def _mask(cls: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Foreground coverage in [0, 1] at (size, size), antialiased by drawing at 2x and box-averaging."""
    ss = 2 if size <= 256 else 1
    n = size * ss
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    u, v = coords[None, :], coords[:, None]  # x to the right, y down, both in [-1, 1]

    if cls in ("checker", "dots", "hstripes", "vstripes"):
        # Textures fill the frame; a random phase replaces a random position.
        cx = cy = 0.0
        rot = {"checker": 15, "dots": 30, "hstripes": 15, "vstripes": 15}[cls]
    else:
        cx, cy = rng.uniform(-0.25, 0.25, 2)
        # Bounded so a square never turns into a diamond or a cross into an X.
        rot = {"circle": 0, "ring": 0, "square": 20, "diamond": 20, "cross": 20, "triangle": 25}[cls]
    theta = np.deg2rad(rng.uniform(-rot, rot))
    c, s = np.cos(theta), np.sin(theta)
    x = c * (u - cx) + s * (v - cy)
    y = -s * (u - cx) + c * (v - cy)

    if cls == "circle":
        r = rng.uniform(0.3, 0.6)
        m = x * x + y * y < r * r
    elif cls == "ring":
        r_out = rng.uniform(0.4, 0.65)
        r_in = r_out * rng.uniform(0.55, 0.7)
        d2 = x * x + y * y
        m = (d2 < r_out * r_out) & (d2 > r_in * r_in)
    elif cls == "square":
        h = rng.uniform(0.25, 0.5)
        m = np.maximum(np.abs(x), np.abs(y)) < h
    elif cls == "diamond":
        h = rng.uniform(0.35, 0.7)
        m = np.abs(x) + np.abs(y) < h
    elif cls == "cross":
        h = rng.uniform(0.35, 0.65)
        w = h * rng.uniform(0.22, 0.35)
        ax, ay = np.abs(x), np.abs(y)
        m = ((ax < w) & (ay < h)) | ((ay < w) & (ax < h))
    elif cls == "triangle":
        # Equilateral, apex up: inside when the point is within the inradius of all three edge normals.
        r = rng.uniform(0.35, 0.65)
        m = np.ones_like(x, dtype=bool)
        for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6):
            m &= x * np.cos(a) - y * np.sin(a) < r / 2
    elif cls == "checker":
        p = rng.uniform(0.25, 0.5)
        px, py = rng.uniform(0, p, 2)
        m = (np.floor((x + px) / p) + np.floor((y + py) / p)) % 2 == 0
    elif cls == "dots":
        p = rng.uniform(0.3, 0.5)
        rd = p * rng.uniform(0.2, 0.3)
        px, py = rng.uniform(0, p, 2)
        dx = (x + px) % p - p / 2
        dy = (y + py) % p - p / 2
        m = dx * dx + dy * dy < rd * rd
    elif cls in ("hstripes", "vstripes"):
        p = rng.uniform(0.2, 0.45)
        along = y if cls == "hstripes" else x
        m = (along + rng.uniform(0, p)) % p < p * rng.uniform(0.4, 0.6)
    else:
        raise ValueError(f"unknown synthetic class {cls!r}")

    m = m.astype(np.float32)
    if ss > 1:
        m = m.reshape(size, ss, size, ss).mean(axis=(1, 3))
    return m


def write_corrupt_files(folder: Path) -> dict[str, Path]:
    """Write files that look like images by name but do not decode; returns their paths by kind.

    Kinds: "truncated" (a valid JPEG cut in half), "zero_byte" (an empty .jpg), "not_image" (text named .jpg).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"{kind}.jpg" for kind in ("truncated", "zero_byte", "not_image")}
    # Large and noisy enough that half the bytes end well inside the entropy-coded scan.
    img = Image.fromarray(render("circle", 128, np.random.default_rng(0)))
    img.save(paths["truncated"], format="JPEG", quality=90)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["zero_byte"].write_bytes(b"")
    paths["not_image"].write_text("this is not an image\n")
    return paths


def write_unusual_images(folder: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write valid images in modes a loader must convert to RGB; returns their paths by kind.

    Kinds: "cmyk" (CMYK JPEG), "gray" (L JPEG), "rgba_png" (RGBA PNG), "png16" (16-bit grayscale PNG, mode I;16),
    "large" (a 3000x2000 RGB JPEG).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(render("square", 96, rng))
    paths = {
        "cmyk": folder / "cmyk.jpg",
        "gray": folder / "gray.jpg",
        "rgba_png": folder / "rgba_png.png",
        "png16": folder / "png16.png",
        "large": folder / "large.jpg",
    }
    rgb.convert("CMYK").save(paths["cmyk"], format="JPEG", quality=90)
    rgb.convert("L").save(paths["gray"], format="JPEG", quality=90)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1)))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(alpha)
    rgba.save(paths["rgba_png"], format="PNG")
    gray16 = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    Image.fromarray(gray16).save(paths["png16"], format="PNG")
    # Drawn small and upscaled: rendering 6 megapixels directly would cost seconds for no benefit.
    big = Image.fromarray(render("ring", 200, rng)).resize((3000, 2000), Image.Resampling.BILINEAR)
    big.save(paths["large"], format="JPEG", quality=85)
    return paths


def write_undecodable_files(folder: Path) -> dict[str, Path]:
    """Write JPEGs that pass a look at their start and end markers but that no decoder accepts; returns their paths.

    Kinds: "bad_frame_header" (the start-of-frame segment zeroed: no size, no components), "over_pixel_limit" (a
    frame header saying 20000x20000, over PIL's decompression-bomb limit).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(render("circle", 32, np.random.default_rng(0))).save(buf, format="JPEG", quality=90)
    good = buf.getvalue()
    sof = good.index(b"\xff\xc0") + 2  # baseline start of frame: length(2) precision(1) height(2) width(2) ...
    paths = {kind: folder / f"{kind}.jpg" for kind in ("bad_frame_header", "over_pixel_limit")}
    paths["bad_frame_header"].write_bytes(good[:sof] + bytes(17) + good[sof + 17 :])
    size = (20000).to_bytes(2, "big")
    paths["over_pixel_limit"].write_bytes(good[: sof + 3] + size + size + good[sof + 7 :])
    return paths
