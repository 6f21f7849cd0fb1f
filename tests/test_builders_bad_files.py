"""Bad input: every kind of bad file stops the build before any shard is written and is listed; with
skip_bad_files the rest builds and the bad files are listed in the metadata and the summary."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401
from builders_testlib import read_split, shard_files, synthetic, write
from vasomim_jax import convert


@pytest.fixture()
def bad_corpus(tmp_path):
    root = tmp_path / "manual"
    cad = root / "cadica"
    for k in range(4):
        synthetic(cad / f"good{k}.png", k, 32)
    (cad / "empty.png").write_bytes(b"")
    data = (cad / "good0.png").read_bytes()
    (cad / "trunc.png").write_bytes(data[: len(data) // 2])
    (cad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (cad / "gone.png").symlink_to(tmp_path / "nowhere.png")  # unreadable: a dangling link
    write(root / "cadica_frangi" / "good0.png", np.zeros((16, 32), np.uint8))  # size differs
    write(root / "cadica_frangi" / "good1.png", np.full((32, 32), 128, np.uint8))  # grey, not a map
    (root / "notes.txt").write_text("ignored")
    bad = {"cadica/empty.png": "empty file", "cadica/trunc.png": "cannot decode",
           "cadica/corrupt.jpg": "cannot decode", "cadica/gone.png": "unreadable",
           "cadica_frangi/good0.png": "differs from its image", "cadica_frangi/good1.png": "not a binary map"}
    return root, bad


def test_bad_files_fail_the_build_before_any_shard_listing_all(bad_corpus, tmp_path):
    root, bad = bad_corpus
    with pytest.raises(SystemExit) as e:
        convert.run("xa170k", manual_dir=str(root), data_dir=str(tmp_path / "data"), num_workers=1)
    message = str(e.value)
    assert "6 bad input file(s)" in message
    for rel, reason in bad.items():
        assert any(str(root / rel) in line and reason in line for line in message.splitlines()), (rel, message)
    assert shard_files(tmp_path / "data") == []
    assert not tfds.builder("xa170k", data_dir=str(tmp_path / "data")).is_prepared()


def test_skip_bad_files_builds_the_rest_and_lists_them(bad_corpus, tmp_path):
    root, bad = bad_corpus
    summary = convert.run("xa170k", manual_dir=str(root), data_dir=str(tmp_path / "data"), num_workers=1,
                          skip_bad_files=True)
    assert sorted(read_split("xa170k", tmp_path / "data")) == ["cadica/good2.png", "cadica/good3.png"]
    meta = tfds.builder("xa170k", data_dir=str(tmp_path / "data")).info.metadata
    listed = meta["skipped_files"]
    assert meta["num_skipped_files"] == 6 and summary.num_skipped_files == 6
    for rel, reason in bad.items():
        # A bad map skips its image: the entry names the map file and the reason.
        assert any(line.startswith(rel + ":") and reason in line for line in listed), (rel, listed)
    assert summary.num_ignored_files == 1 and "skipped bad files: 6" in summary.text()


def test_duplicate_keys_are_a_clear_error(tmp_path):
    root = tmp_path / "seg"
    img = synthetic(root / "images" / "a.png", 0, 32)
    write(root / "images" / "a.jpg", img)
    write(root / "masks" / "a_gt.png", (img < 100).astype(np.uint8) * 255)
    with pytest.raises(SystemExit, match="duplicate example key.*'a'"):
        convert.run("vessel_seg_folder", manual_dir=str(root), data_dir=str(tmp_path / "data"), num_workers=1)


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_missing_or_empty_manual_dir_prints_the_instructions(tmp_path, make):
    manual = tmp_path / "manual"
    if make == "empty":
        manual.mkdir()
    with pytest.raises(SystemExit, match="missing or empty(.|\n)*cadica_frangi"):
        convert.run("xa170k", manual_dir=str(manual), data_dir=str(tmp_path / "data"))


def test_tfds_api_with_an_empty_manual_dir_gives_tfds_instructions(tmp_path):
    (tmp_path / "manual").mkdir()
    builder = tfds.builder("angio_folder", data_dir=str(tmp_path / "data"))
    with pytest.raises(AssertionError, match="does not exist or is empty(.|\n)*--manual_dir"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(tmp_path / "manual")), file_format="array_record")


def test_xa170k_without_source_folders_names_them(tmp_path):
    (tmp_path / "manual" / "other").mkdir(parents=True)
    (tmp_path / "manual" / "other" / "x.png").write_bytes(b"x")
    with pytest.raises(SystemExit, match="none of the source folders cadica/, syntax/"):
        convert.run("xa170k", manual_dir=str(tmp_path / "manual"), data_dir=str(tmp_path / "data"))


def test_segmentation_pairs_without_mask_or_with_a_wrong_size_mask_are_bad(tmp_path):
    root = tmp_path / "seg"
    for k in range(3):
        synthetic(root / "images" / "train" / f"{k}.png", k, 32)
    write(root / "masks" / "train" / "0_gt.png", np.zeros((32, 32), np.uint8))
    write(root / "masks" / "train" / "1_gt.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(SystemExit) as e:
        convert.run("vessel_seg_folder", manual_dir=str(root), data_dir=str(tmp_path / "data"), num_workers=1)
    assert "2 bad input file(s)" in str(e.value)
    assert "2.png: no mask 2_gt.*" in str(e.value) and "1_gt.png: mask size 16x16 differs" in str(e.value)
    summary = convert.run("vessel_seg_folder", manual_dir=str(root), data_dir=str(tmp_path / "data"),
                          num_workers=1, skip_bad_files=True)
    assert summary.examples_per_split == {"train": 1} and summary.num_skipped_files == 2


def _only_a_readme(root):
    root.mkdir()
    (root / "README.md").write_text("ignored")


def _only_non_images(root):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "images" / "notes.txt").write_text("ignored")


def _one_split_all_bad(root):
    synthetic(root / "train" / "a" / "0.png", 0, 32)
    (root / "test" / "a").mkdir(parents=True)
    (root / "test" / "a" / "1.png").write_bytes(b"")


def _annotations_without_images(root):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "annotations" / "test.json").write_text('{"images": [], "annotations": []}')


@pytest.mark.parametrize("name, layout, where", [
    ("angio_folder", _only_a_readme, r"split\(s\) train"),
    ("vessel_seg_folder", _only_non_images, "any split"),
    ("class_folder", _one_split_all_bad, r"split\(s\) test"),
    ("arcade", _annotations_without_images, r"split\(s\) test"),
])
def test_a_build_with_an_empty_split_fails_naming_the_manual_dir(tmp_path, name, layout, where):
    root = tmp_path / "manual"
    layout(root)
    message = f"{name}/.*no usable examples for {where} in the manual_dir {re.escape(str(root))} "
    with pytest.raises(SystemExit, match=message):
        convert.run(name, manual_dir=str(root), data_dir=str(tmp_path / "data"), num_workers=1, skip_bad_files=True)
    assert shard_files(tmp_path / "data") == []
