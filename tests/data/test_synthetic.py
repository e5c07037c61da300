import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastft.data.synthetic import (
    CLASS_NAMES,
    MANIFEST_NAME,
    make_image_folder,
    synthetic_batch,
    write_corrupt_files,
    write_unusual_images,
)

SMALL = {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 32}


def _images(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in {".jpg", ".png"}
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("default")
    start = time.perf_counter()
    make_image_folder(root)
    return root, time.perf_counter() - start


def _load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for c, name in enumerate(CLASS_NAMES):
        for p in sorted((root / split / name).iterdir()):
            images.append(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
            labels.append(c)
    return np.stack(images), np.array(labels)


def _nearest_centroid_accuracy(f_train, y_train, f_val, y_val) -> float:
    centroids = np.stack([f_train[y_train == c].mean(0) for c in range(len(CLASS_NAMES))])
    dist = ((f_val[:, None] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == y_val).mean())


def _pool(a: np.ndarray, k: int) -> np.ndarray:
    n = a.shape[1] // k
    return a.reshape(len(a), n, k, n, k).mean((2, 4))


def _standardise(f: np.ndarray) -> np.ndarray:
    f = f.reshape(len(f), -1)
    return (f - f.mean(1, keepdims=True)) / (f.std(1, keepdims=True) + 1e-6)


def _edge_features(images: np.ndarray) -> np.ndarray:
    # Gradient magnitudes, because the shape may be lighter or darker than its background (random polarity
    # cancels out in a centroid of raw grayscale); |dx| and |dy| kept apart so stripe orientation shows.
    gray = _pool(images @ np.array([0.299, 0.587, 0.114], dtype=np.float32), 2)  # 32x32
    gx = np.pad(np.abs(np.diff(gray, axis=2)), ((0, 0), (0, 0), (0, 1)))
    gy = np.pad(np.abs(np.diff(gray, axis=1)), ((0, 0), (0, 1), (0, 0)))
    return np.concatenate([_standardise(_pool(gx, 2)), _standardise(_pool(gy, 2))], axis=1)  # 2 x 16x16


def test_class_names_sorted_and_unique():
    assert len(CLASS_NAMES) == 10
    assert list(CLASS_NAMES) == sorted(set(CLASS_NAMES))


def test_split_layout_counts(tmp_path):
    root = make_image_folder(tmp_path / "ds", **SMALL)
    assert root == tmp_path / "ds"
    assert sorted(p.name for p in root.iterdir()) == sorted([MANIFEST_NAME, "train", "val"])
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(CLASS_NAMES[:3])
        for name in CLASS_NAMES[:3]:
            files = sorted(p.name for p in (root / split / name).iterdir())
            assert files == [f"{name}_{i:04d}.jpg" for i in range(n)]
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["count"] == 3 * (4 + 2) == len(manifest["files"])


def test_flat_layout_counts_and_matches_split(tmp_path):
    flat = make_image_folder(tmp_path / "flat", layout="flat", fmt="png", **SMALL)
    split = make_image_folder(tmp_path / "split", layout="split", fmt="png", **SMALL)
    assert sorted(p.name for p in flat.iterdir() if p.is_dir()) == list(CLASS_NAMES[:3])
    for name in CLASS_NAMES[:3]:
        files = sorted((flat / name).iterdir())
        assert [p.name for p in files] == [f"{name}_{i:04d}.png" for i in range(6)]
        # The flat folder holds the train images followed by the val images, pixel for pixel.
        expected = sorted((split / "train" / name).iterdir()) + sorted((split / "val" / name).iterdir())
        assert [p.read_bytes() for p in files] == [p.read_bytes() for p in expected]


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = _images(make_image_folder(tmp_path / "a", seed=3, **SMALL))
    b = _images(make_image_folder(tmp_path / "b", seed=3, **SMALL))
    c = _images(make_image_folder(tmp_path / "c", seed=4, **SMALL))
    assert len(a) == 18 and a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_cache_is_reused(tmp_path):
    root = make_image_folder(tmp_path, **SMALL)
    before = _mtimes(root)
    time.sleep(0.01)
    make_image_folder(root, **SMALL)
    assert _mtimes(root) == before


def test_changed_arguments_regenerate_and_remove_stale_files(tmp_path):
    user_file = tmp_path / "train" / "notes.txt"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("mine")
    root = make_image_folder(tmp_path, num_classes=4, train_per_class=5, val_per_class=2, image_size=32)
    old = set(_images(root))
    assert len(old) == 4 * 7

    make_image_folder(root, **SMALL)
    new = set(_images(root))
    assert len(new) == 18 and new <= old
    assert not (root / "train" / CLASS_NAMES[3]).exists()  # an empty class folder would be an empty class
    assert not (root / "train" / CLASS_NAMES[0] / f"{CLASS_NAMES[0]}_0004.jpg").exists()
    assert user_file.read_text() == "mine"  # files the generator did not make are left alone
    assert json.loads((root / MANIFEST_NAME).read_text())["args"]["num_classes"] == 3

    # Switching layout must not leave the split folders behind (they would read as classes).
    make_image_folder(root, layout="flat", **SMALL)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted([*CLASS_NAMES[:3], "train"])
    assert list((root / "train").iterdir()) == [user_file]


def test_interrupted_generation_is_redone(tmp_path):
    reference = _images(make_image_folder(tmp_path / "ref", **SMALL))
    root = make_image_folder(tmp_path / "ds", **SMALL)
    # An interruption leaves no manifest and maybe a half-written file.
    (root / MANIFEST_NAME).unlink()
    half = root / "val" / CLASS_NAMES[1] / f"{CLASS_NAMES[1]}_0001.jpg"
    half.write_bytes(half.read_bytes()[:10])
    make_image_folder(root, **SMALL)
    assert (root / MANIFEST_NAME).is_file()
    assert _images(root) == reference


def test_missing_file_triggers_regeneration(tmp_path):
    root = make_image_folder(tmp_path, **SMALL)
    victim = root / "train" / CLASS_NAMES[2] / f"{CLASS_NAMES[2]}_0003.jpg"
    data = victim.read_bytes()
    victim.unlink()
    make_image_folder(root, **SMALL)
    assert victim.read_bytes() == data


@pytest.mark.parametrize("num_classes", [0, 1, 11])
def test_invalid_num_classes(tmp_path, num_classes):
    with pytest.raises(ValueError, match=f"got {num_classes}$"):
        make_image_folder(tmp_path, num_classes=num_classes)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_every_file_opens_at_requested_size(tmp_path, fmt):
    root = make_image_folder(tmp_path, fmt=fmt, num_classes=10, train_per_class=2, val_per_class=1, image_size=40)
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]
    assert len(files) == 30
    for p in files:
        assert p.suffix == f".{fmt}"
        with Image.open(p) as img:
            img.load()
            assert img.size == (40, 40) and img.mode == "RGB"
            assert img.format == {"jpg": "JPEG", "png": "PNG"}[fmt]


def test_default_dataset_is_fast(default_dataset):
    root, seconds = default_dataset
    assert len(_images(root)) == 10 * (40 + 15)
    assert seconds < 10, f"generating the default dataset took {seconds:.1f} s"


def test_classes_differ_by_shape_not_colour(default_dataset):
    root, _ = default_dataset
    x_train, y_train = _load(root, "train")
    x_val, y_val = _load(root, "val")
    assert x_train.shape == (400, 64, 64, 3) and x_val.shape == (150, 64, 64, 3)

    colour_acc = _nearest_centroid_accuracy(x_train.mean((1, 2)), y_train, x_val.mean((1, 2)), y_val)
    shape_acc = _nearest_centroid_accuracy(_edge_features(x_train), y_train, _edge_features(x_val), y_val)
    # Chance is 10%; observed with seed 0: colour 8%, shape 41%.
    assert colour_acc <= 0.20, f"mean colour predicts the class ({colour_acc:.0%})"
    assert shape_acc >= 0.30, f"shape does not predict the class ({shape_acc:.0%})"


def test_corrupt_files_do_not_decode(tmp_path):
    paths = write_corrupt_files(tmp_path / "bad")
    assert set(paths) == {"truncated", "zero_byte", "not_image"}
    assert paths["zero_byte"].stat().st_size == 0
    for p in paths.values():
        assert p.parent == tmp_path / "bad" and p.suffix == ".jpg"
        # UnidentifiedImageError is an OSError too.
        with pytest.raises(OSError), Image.open(p) as img:
            img.load()
    # The truncated file really is half a JPEG: it starts like one.
    assert paths["truncated"].read_bytes()[:2] == b"\xff\xd8"


def test_unusual_images_are_valid(tmp_path):
    paths = write_unusual_images(tmp_path / "odd")
    modes = {"cmyk": "CMYK", "gray": "L", "rgba_png": "RGBA", "png16": "I;16", "large": "RGB"}
    assert set(paths) == set(modes)
    for kind, p in paths.items():
        with Image.open(p) as img:
            img.load()
            assert img.mode == modes[kind], kind
            rgb = img.convert("RGB")
            assert rgb.mode == "RGB" and rgb.size == img.size
            # Not a blank image: the conversion must carry content through. Pillow clips I;16 to 255 instead of
            # scaling it, so a plain convert("RGB") of a full-range 16-bit PNG is all white; loaders must rescale.
            if kind != "png16":
                assert np.asarray(rgb).std() > 5, kind
    with Image.open(paths["large"]) as img:
        assert img.size == (3000, 2000) and img.format == "JPEG"
    with Image.open(paths["png16"]) as img:
        assert img.format == "PNG" and np.asarray(img).max() > 255  # really 16-bit values


def test_synthetic_batch():
    images, labels = synthetic_batch(8, image_size=32, num_classes=5, seed=1)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() < 5
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1  # normalised

    again, again_labels = synthetic_batch(8, image_size=32, num_classes=5, seed=1)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, synthetic_batch(8, image_size=32, num_classes=5, seed=2)[0])

    half, half_labels = synthetic_batch(8, image_size=32, num_classes=5, seed=1, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, images.to(torch.bfloat16))
    assert torch.equal(half_labels, labels)
