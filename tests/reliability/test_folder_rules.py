"""Defined behaviour of image folders (README, "Data"): train/val with different class sets, a class with no images,
hidden files and folders, and non-image files next to the images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _reliability import FAST, cli, error_line, mentions, trained_run
from PIL import Image

from fastft.config import DataConfig
from fastft.data.index import index_from_config
from fastft.errors import DataError


@pytest.fixture
def data(shapes4, tmp_path) -> Path:
    return Path(shutil.copytree(shapes4, tmp_path / "data"))


def _index(root: Path):
    return index_from_config(DataConfig(root=str(root)))


def _train(root: Path, out: Path) -> tuple[int, str]:
    return cli("train", f"--data.root={root}", *FAST, "--data.workers=0", f"--run.out_dir={out}")


def test_a_val_class_that_train_lacks_is_an_error_naming_it(data, tmp_path) -> None:
    shutil.copytree(data / "val" / "circle", data / "val" / "zebra")
    with pytest.raises(DataError, match=r"class 'zebra' is in .*val but not in .*train"):
        _index(data)
    rc, err = _train(data, tmp_path / "runs")
    assert rc == 2 and "'zebra'" in error_line(err)
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_a_train_class_missing_from_val_is_allowed_and_gets_no_support(data, shapes4, tmp_path_factory) -> None:
    shutil.rmtree(data / "val" / "cross")
    index = _index(data)
    assert index.classes == ["checker", "circle", "cross", "diamond"]  # the mapping is train's, unchanged
    assert len(index.train) == 48 and len(index.val) == 18 and 2 not in {y for _, y in index.val}
    from fastft.api import evaluate

    ckpt = trained_run(shapes4, tmp_path_factory)["result"].paths["last"]
    report = evaluate(ckpt, data / "val", workers=0, device="cpu", precision="fp32").metrics
    assert report["num_samples"] == 18
    assert [r["support"] for r in report["per_class"]] == [6, 6, 0, 6]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_folder_without_images_is_an_error_naming_it(data, tmp_path, split) -> None:
    empty = data / split / "zebra"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    (empty / ".hidden.jpg").write_bytes((data / "train" / "circle" / "circle_0000.jpg").read_bytes())
    with pytest.raises(DataError, match=f"class folder has no images: {empty}"):
        _index(data)
    rc, err = _train(data, tmp_path / "runs")
    assert rc == 2 and str(empty) in error_line(err)


def test_hidden_files_and_folders_and_non_images_are_ignored(data) -> None:
    before = _index(data)
    good = data / "train" / "circle" / "circle_0000.jpg"
    checker = data / "train" / "checker"
    shutil.copy(good, checker / ".hidden.jpg")  # hidden file with an image extension
    shutil.copy(good, checker / "._circle_0000.jpg")  # macOS AppleDouble companion
    (checker / ".ipynb_checkpoints").mkdir()
    shutil.copy(good, checker / ".ipynb_checkpoints" / "copy.jpg")  # image inside a hidden folder
    (checker / "labels.txt").write_text("checker\n")
    (checker / "Thumbs.db").write_bytes(b"\x00" * 64)
    (checker / "notes").write_text("no extension")
    (data / "train" / ".cache").mkdir()  # a hidden "class" folder with images
    shutil.copy(good, data / "train" / ".cache" / "x.jpg")
    (data / "train" / "README.txt").write_text("a file, not a class folder")
    after = _index(data)
    assert after.classes == before.classes and after.train == before.train and after.val == before.val


def test_images_in_sub_folders_and_upper_case_extensions_are_counted(data) -> None:
    before = _index(data)
    checker = data / "train" / "checker"
    (checker / "more").mkdir()
    Image.open(checker / "checker_0000.jpg").save(checker / "more" / "EXTRA.JPG")
    Image.open(checker / "checker_0000.jpg").save(checker / "extra.Png")
    after = _index(data)
    added = sorted(set(after.train) - set(before.train))
    assert added == [(str(checker / "extra.Png"), 0), (str(checker / "more" / "EXTRA.JPG"), 0)]


# --------------------------------------------------------------------------------------------------------------------
# symlinks: files are followed once; folder links back into the data folder are refused, naming the link


@pytest.mark.parametrize(("name", "target"), [("loop", "."), ("up", ".."), ("other", "../circle")])
def test_a_folder_symlink_back_into_the_data_is_an_error_naming_it(data, tmp_path, name, target) -> None:
    """`loop -> .` used to index the class's images ~40 times (until the OS refused the path), `up -> ..` to label
    every class's images as this one, a link to another class to count its images twice."""
    link = data / "train" / "checker" / name
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(DataError, match=f"folder symlink {link} -> .* points back into the data folder"):
        _index(data)
    rc, err = _train(data, tmp_path / "runs")
    assert rc == 2 and mentions(error_line(err), str(link))
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_a_class_folder_symlink_to_another_class_is_an_error(data) -> None:
    (data / "train" / "alias").symlink_to(data / "train" / "circle", target_is_directory=True)
    with pytest.raises(DataError, match=f"folder symlink {data / 'train' / 'alias'} -> "):
        _index(data)


def test_folder_symlinks_out_of_the_data_and_file_symlinks_are_followed_once(data, tmp_path) -> None:
    before = _index(data)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data / "train" / "circle", elsewhere / "more")
    checker = data / "train" / "checker"
    (checker / "ext").symlink_to(elsewhere, target_is_directory=True)  # outside the data folder: followed
    (elsewhere / "more" / "back").symlink_to(elsewhere, target_is_directory=True)  # a loop outside: refused
    with pytest.raises(DataError, match="loops"):
        _index(data)
    (elsewhere / "more" / "back").unlink()
    (checker / "alias.jpg").symlink_to(data / "train" / "circle" / "circle_0000.jpg")  # a file link: one sample
    after = _index(data)
    added = sorted(set(after.train) - set(before.train))
    n_ext = len(list((elsewhere / "more").glob("*.jpg")))
    assert len(after.train) == len(before.train) + n_ext + 1
    assert {y for _, y in added} == {0}  # all under the class the links sit in
    assert (str(checker / "alias.jpg"), 0) in added
