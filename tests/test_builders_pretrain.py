"""Pre-training builders (xa170k, angio_folder, synthetic_angio): what goes in comes back, maps supplied or
computed by the official recipe, the metadata counts, and reading without TensorFlow from a fresh process."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401
from builders_testlib import read_split, real, synthetic, write
from tfds_builders import images
from vasomim_jax import convert, vesselness


def _map_file(path, seed: int, shape, scale: int):
    m = (np.random.default_rng(seed).random(shape) > 0.9).astype(np.uint8)
    write(path, m * scale)
    return m


@pytest.fixture(scope="module")
def xa_dir(tmp_path_factory):
    """A miniature XA-170K: real ARCADE images in cadica/ (maps for two of three in cadica_frangi/), synthetic
    images elsewhere: syntax/ with syntax_filter_92/ {0,1} maps, xcad/ and coronarydominance/ without maps."""
    arcade = real("arcade_stenosis_test") / "images"
    root = tmp_path_factory.mktemp("xa170k_manual")
    expected = {}  # file_name -> (source, image, supplied map or None)
    for i, name in enumerate(["1.png", "2.png", "3.png"]):
        dst = root / "cadica" / "p1" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(arcade / name, dst)
        img = images.read_image(dst)
        vmap = _map_file(root / "cadica_frangi" / "p1" / name, i, img.shape, 255) if i < 2 else None
        expected[f"cadica/p1/{name}"] = ("cadica", img, vmap)
    for src, seeds, map_dir in (("syntax", (10, 11), "syntax_filter_92"), ("xcad", (12, 13), None),
                                ("coronarydominance", (14, 15), None)):
        for s in seeds:
            img = synthetic(root / src / f"{s}.png", s, 64)
            vmap = _map_file(root / map_dir / f"{s}.png", s, img.shape, 1) if map_dir else None
            expected[f"{src}/{s}.png"] = (src, img, vmap)
    (root / "README.txt").write_text("XA-170K miniature")
    (root / "cadica" / ".DS_Store").write_bytes(b"\0")
    return root, expected


@pytest.fixture(scope="module")
def xa_native(xa_dir, tmp_path_factory):
    root, _ = xa_dir
    data_dir = tmp_path_factory.mktemp("xa170k_data")
    summary = convert.run("xa170k", manual_dir=str(root), data_dir=str(data_dir), num_workers=2)
    return data_dir, summary


def test_xa170k_native_stores_images_and_supplied_or_recipe_maps(xa_dir, xa_native):
    _, expected = xa_dir
    data_dir, _ = xa_native
    records = read_split("xa170k/native", data_dir)
    assert sorted(records) == sorted(expected)
    for name, (source, img, vmap) in expected.items():
        rec = records[name]
        assert rec["source"] == source
        np.testing.assert_array_equal(rec["image"][..., 0], img)
        want = vmap if vmap is not None else vesselness.vessel_map(img, border=20)
        np.testing.assert_array_equal(rec["vessel_map"][..., 0], want, err_msg=name)
        assert rec["vessel_fraction"] == pytest.approx(want.mean(), abs=1e-7)


def test_xa170k_metadata_counts_sources_maps_and_ignored_files(xa_native):
    data_dir, summary = xa_native
    builder = tfds.builder("xa170k/native", data_dir=str(data_dir))
    meta = builder.info.metadata
    assert meta["num_images_per_source"] == {"cadica": 3, "coronarydominance": 2, "syntax": 2, "xcad": 2}
    assert (meta["num_maps_supplied"], meta["num_maps_computed"]) == (4, 5)
    assert meta["num_ignored_files"] == 2 and meta["ignored_files"] == ["README.txt", "cadica/.DS_Store"]
    assert summary.examples_per_split == {"train": 9} and summary.images_per_source["cadica"] == 3
    assert summary.num_skipped_files == 0 and summary.built


def test_xa170k_r256_is_native_resized_with_nearest_maps(xa_dir, xa_native, tmp_path):
    root, _ = xa_dir
    native = read_split("xa170k/native", xa_native[0])
    builder = tfds.builder("xa170k/r256", data_dir=str(tmp_path), num_workers=1)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)),
                                 file_format="array_record")
    r256 = read_split("xa170k/r256", tmp_path)
    assert sorted(r256) == sorted(native)
    for name, rec in r256.items():
        assert min(rec["image"].shape[:2]) == 256
        np.testing.assert_array_equal(rec["image"][..., 0], images.resize_shorter(native[name]["image"][..., 0], 256))
        np.testing.assert_array_equal(rec["vessel_map"][..., 0],
                                      images.resize_shorter(native[name]["vessel_map"][..., 0], 256, nearest=True))


def test_angio_folder_reads_every_format_and_one_example_per_dicom_frame(tmp_path):
    root = tmp_path / "folder"
    img8 = synthetic(root / "a" / "x.png", 1, 48)
    img16 = (synthetic(tmp_path / "tmp16.png", 2, 48).astype(np.uint16) * 257 + 3)
    write(root / "a" / "y16.png", img16)
    rgb = np.stack([synthetic(tmp_path / f"c{k}.png", 3 + k, 48) for k in range(3)], -1)
    write(root / "b" / "z.tif", rgb)
    write(root / "b" / "w.bmp", img8)
    (root / "b" / "notes.json").write_text("{}")
    from test_builders_images import _write_dicom

    frames = np.stack([synthetic(tmp_path / f"f{k}.png", 20 + k, 48) for k in range(3)]).astype(np.uint16) * 16
    _write_dicom(root / "cine.dcm", frames, center=2048, width=4096)
    builder = tfds.builder("angio_folder", data_dir=str(tmp_path / "data"), num_workers=1)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)),
                                 file_format="array_record")
    records = read_split("angio_folder", tmp_path / "data")
    assert sorted(records) == ["a/x.png", "a/y16.png", "b/w.bmp", "b/z.tif", "cine.dcm#0", "cine.dcm#1",
                               "cine.dcm#2"]
    assert records["a/x.png"]["source"] == "a" and records["cine.dcm#1"]["source"] == "folder"
    dicom = images.read_frames(root / "cine.dcm")
    for name, rec in records.items():
        want = dicom[int(name[-1])] if "#" in name else images.read_image(root / name)
        np.testing.assert_array_equal(rec["image"][..., 0], want, err_msg=name)
    assert builder.info.metadata["num_ignored_files"] == 1


def test_synthetic_small_is_the_generator_output_and_reads_in_a_fresh_process(tmp_path):
    builder = tfds.builder("synthetic_angio", data_dir=str(tmp_path))
    assert builder.builder_config.name == "small"
    builder.download_and_prepare(file_format="array_record")
    from vasomim_jax import synthetic as syn

    src = tfds.data_source("synthetic_angio/small", split="train", data_dir=str(tmp_path))
    assert len(src) == 512
    by_name = {}
    for i in range(len(src)):
        by_name[src[i]["file_name"].decode()] = i
    for seed in (0, 137, 511):
        rec = src[by_name[f"synthetic/{seed:06d}"]]
        img, mask = syn.angiogram(seed, 96)
        np.testing.assert_array_equal(rec["image"][..., 0], img)
        np.testing.assert_array_equal(rec["gt_mask"][..., 0], mask)
        np.testing.assert_array_equal(rec["vessel_map"][..., 0], vesselness.vessel_map(img, border=4))
    code = (
        "import sys, tensorflow_datasets as tfds, tfds_builders\n"
        f"src = tfds.data_source('synthetic_angio/small', split='train', data_dir={str(tmp_path)!r})\n"
        "e = src[3]\n"
        "assert e['image'].shape == (96, 96, 1) and e['vessel_map'].dtype.name == 'uint8', e\n"
        "assert 'tensorflow' not in sys.modules, 'reading imported TensorFlow'\n"
        "print(len(src))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "512"
