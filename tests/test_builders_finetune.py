"""Fine-tuning builders on real data (ARCADE, CIMAT) and miniature folders: pixels and labels round-trip."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import tensorflow_datasets as tfds

import tfds_builders  # noqa: F401
from builders_testlib import read_split, real, synthetic, write
from tfds_builders import images

ARCADE_SUBSET = ["1.png", "2.png", "3.png", "10.png", "100.png", "101.png"]


def _build(name, manual, data_dir, **kw):
    builder = tfds.builder(name, data_dir=str(data_dir), num_workers=1, **kw)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
                                 file_format="array_record")
    return builder


def test_arcade_stenosis_rasterises_the_published_masks(tmp_path):
    src = real("arcade_stenosis_test")
    coco = json.loads((src / "annotations" / "test.json").read_text())
    keep = {im["id"] for im in coco["images"] if im["file_name"] in ARCADE_SUBSET}
    coco["images"] = [im for im in coco["images"] if im["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    manual = tmp_path / "arcade"
    (manual / "annotations").mkdir(parents=True)
    (manual / "annotations" / "test.json").write_text(json.dumps(coco))
    (manual / "images").mkdir()
    for name in ARCADE_SUBSET:
        (manual / "images" / name).symlink_to(src / "images" / name)
    builder = _build("arcade/stenosis", manual, tmp_path / "data")
    assert list(builder.info.splits) == ["test"]
    records = read_split("arcade/stenosis", tmp_path / "data", "test")
    assert sorted(records) == sorted(ARCADE_SUBSET)
    for name, rec in records.items():
        np.testing.assert_array_equal(rec["image"][..., 0], images.read_image(src / "images" / name))
        published = cv2.imread(str(src / "masks" / name), cv2.IMREAD_GRAYSCALE) > 127
        assert np.count_nonzero((rec["mask"][..., 0] > 0) != published) <= 1, name
        assert rec["mask"].max() == 1


def test_arcade_syntax_draws_segment_ids_and_their_union_per_split(tmp_path):
    manual = tmp_path / "arcade"
    for split, seeds in (("train", (0, 1)), ("val", (2,))):
        entries, anns = [], []
        for k, seed in enumerate(seeds):
            synthetic(manual / "syntax" / split / "images" / f"{seed}.png", seed, 48)
            entries.append({"id": k + 1, "file_name": f"{seed}.png", "width": 48, "height": 48})
            anns.append({"id": 2 * k + 1, "image_id": k + 1, "category_id": 5,
                         "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]]})
            anns.append({"id": 2 * k + 2, "image_id": k + 1, "category_id": 25,
                         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]})
        ann_dir = manual / "syntax" / split / "annotations"
        ann_dir.mkdir(parents=True)
        (ann_dir / f"{split}.json").write_text(json.dumps({"images": entries, "annotations": anns}))
    builder = _build("arcade/syntax", manual, tmp_path / "data")
    assert sorted(builder.info.splits) == ["train", "validation"]
    rec = read_split("arcade/syntax", tmp_path / "data", "validation")["2.png"]
    seg = rec["segment_mask"][..., 0]
    assert seg[5, 5] == 5 and seg[15, 15] == 25 and seg[25, 25] == 25 and seg[40, 40] == 0
    np.testing.assert_array_equal(rec["vessel_mask"][..., 0], (seg > 0).astype(np.uint8))


def test_vessel_seg_folder_pairs_cimat_images_and_binarised_masks(tmp_path):
    src = real("cimat_xca80")
    manual = tmp_path / "cimat"
    for n, split in ((1, "training"), (2, "training"), (29, "training"), (3, "testing"), (4, "testing"), (5, "val")):
        for kind, name in (("images", f"{n}.png"), ("masks", f"{n}_gt.png")):
            (manual / kind / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(src / kind / "training" / name, manual / kind / split / name)
    builder = _build("vessel_seg_folder", manual, tmp_path / "data")
    assert sorted(builder.info.splits) == ["test", "train", "validation"]
    train = read_split("vessel_seg_folder", tmp_path / "data", "train")
    assert sorted(train) == ["training/1.png", "training/2.png", "training/29.png"]
    for name, rec in train.items():
        n = name.split("/")[1][:-4]
        np.testing.assert_array_equal(rec["image"][..., 0], images.read_image(src / "images" / "training" / f"{n}.png"))
        gt = cv2.imread(str(src / "masks" / "training" / f"{n}_gt.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(rec["mask"][..., 0], (gt > 127).astype(np.uint8))


def test_vessel_seg_folder_builds_a_manual_dir_of_symlinked_split_folders_and_files(tmp_path):
    store, manual = tmp_path / "store", tmp_path / "manual"
    imgs = {k: synthetic(store / "images" / f"{k}.png", k, 32) for k in range(3)}
    for k, img in imgs.items():
        write(store / "masks" / f"{k}_gt.png", (img < 90).astype(np.uint8) * 255)
    for kind in ("images", "masks"):
        (manual / kind / "testing").mkdir(parents=True)
        (manual / kind / "training").symlink_to(store / kind)
    for kind, name in (("images", "9.png"), ("masks", "9_gt.png")):
        (manual / kind / "testing" / name).symlink_to(store / kind / name.replace("9", "0"))
    builder = _build("vessel_seg_folder", manual, tmp_path / "data")
    assert {s: int(i.num_examples) for s, i in builder.info.splits.items()} == {"test": 1, "train": 3}
    train = read_split("vessel_seg_folder", tmp_path / "data", "train")
    np.testing.assert_array_equal(train["training/1.png"]["mask"][..., 0], (imgs[1] < 90).astype(np.uint8))


def test_vessel_seg_folder_pairing_rule_is_configurable_with_fov(tmp_path):
    manual = tmp_path / "drive"
    img = synthetic(manual / "img" / "21_training.png", 0, 32)
    write(manual / "gt" / "21_training_manual1.gif", (img < 90).astype(np.uint8) * 255)  # GIF masks as DRIVE
    write(manual / "fov" / "21_training_mask.pgm", np.full((32, 32), 255, np.uint8))
    from tfds_builders.vessel_seg_folder.vessel_seg_folder_dataset_builder import PairingConfig

    config = PairingConfig(name="drive_like", image_dir="img", mask_dir="gt", mask_suffix="_manual1",
                           fov_dir="fov", fov_suffix="_mask")
    _build("vessel_seg_folder", manual, tmp_path / "data", config=config)
    (rec,) = read_split("vessel_seg_folder/drive_like", tmp_path / "data").values()
    np.testing.assert_array_equal(rec["mask"][..., 0], (img < 90).astype(np.uint8))
    assert rec["fov"].min() == 1


def test_class_folder_labels_from_folder_names(tmp_path):
    manual = tmp_path / "crops"
    for split, label, seed in (("train", "stenosis", 0), ("train", "normal", 1), ("training", "normal", 2),
                               ("test", "stenosis", 3)):
        synthetic(manual / split / label / f"{seed}.png", seed, 32)
    (manual / "train" / "labels.csv").write_text("ignored")
    builder = _build("class_folder", manual, tmp_path / "data")
    assert builder.info.features["label"].names == ["normal", "stenosis"]
    train = read_split("class_folder", tmp_path / "data", "train")
    assert {k: v["label"] for k, v in train.items()} == {"train/stenosis/0.png": 1, "train/normal/1.png": 0,
                                                         "training/normal/2.png": 0}
    np.testing.assert_array_equal(train["train/normal/1.png"]["image"][..., 0],
                                  images.read_image(manual / "train" / "normal" / "1.png"))
    assert builder.info.metadata["num_ignored_files"] == 1
