"""ARCADE (MICCAI 2023): stenosis and SYNTAX vessel-segment segmentation from the COCO polygon annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from tfds_builders import common, images

STENOSIS_CATEGORY = 26
NUM_SEGMENTS = 25  # SYNTAX segment categories 1..25
SPLITS = {"train": "train", "val": "validation", "test": "test"}


def find_splits(root: Path, task: str) -> dict[str, tuple[Path, Path]]:
    """{tfds split: (images folder, COCO json)} for the splits present.

    Accepted layouts (`<s>` = train | val | test): the Zenodo release `[<task>/]<s>/images/`,
    `[<task>/]<s>/annotations/<s>.json`, or one split flat: `images/` + `annotations/<s>.json`.
    """
    base = root / task if (root / task).is_dir() else root
    found = {}
    for s, split in SPLITS.items():
        for img_dir, ann in ((base / s / "images", base / s / "annotations" / f"{s}.json"),
                             (base / "images", base / "annotations" / f"{s}.json")):
            if ann.is_file() and img_dir.is_dir():
                found[split] = (img_dir, ann)
                break
    if not found:
        raise FileNotFoundError(f"arcade/{task}: no <split>/images + <split>/annotations/<split>.json (or "
                                f"images/ + annotations/<split>.json) under {base}.\n"
                                f"{Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return found


def rasterise(annotations: list[dict], shape: tuple[int, int], task: str) -> np.ndarray:
    """COCO polygons → uint8 (H, W): stenosis {0,1}, or segment ids 0..25 (later annotations drawn on top).

    Drawn with PIL's polygon fill (float vertices, edges included), which reproduces the masks published with
    the ARCADE stenosis data (39 of 40 checked images identical, the last one 1 pixel off).
    """
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for ann in sorted(annotations, key=lambda a: a["id"]):
        cat = int(ann["category_id"])
        if task == "stenosis":
            if cat != STENOSIS_CATEGORY:
                continue
            value = 1
        else:
            if not 1 <= cat <= NUM_SEGMENTS:
                continue
            value = cat
        for poly in ann["segmentation"]:
            if len(poly) >= 6:
                draw.polygon([(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])], fill=value)
    return np.asarray(canvas, np.uint8)


def _check_image(item: tuple[str, int, int]) -> tuple[int, int] | images.BadFileError:
    path, h, w = item
    try:
        img = images.read_image(path)
    except images.BadFileError as e:
        return e
    if img.shape != (h, w):
        return images.BadFileError(path, f"image is {img.shape[1]}x{img.shape[0]}, the annotation says {w}x{h}")
    return img.shape


class Builder(common.VasoBuilder):
    """ARCADE stenosis (`stenosis`) and vessel-segment (`syntax`) segmentation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        common.VasoConfig(name="stenosis", description="Binary stenosis-region masks (category 26)."),
        common.VasoConfig(name="syntax", description="SYNTAX segment ids 1-25 and their binary vessel union."),
    ]
    DEFAULT_CONFIG_NAME = "stenosis"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download ARCADE from Zenodo (doi 10.5281/zenodo.10390295; Popov et al., Sci Data 2024) and extract it so that
    the manual_dir holds `stenosis/` and `syntax/`, each with `train/`, `val/`, `test/` folders of
    `images/*.png` and `annotations/<split>.json` (COCO). A folder with a single split laid out flat
    (`images/` + `annotations/test.json`) works too. Splits present are built: train, validation (val), test.
      vasomim convert arcade/stenosis --manual_dir=<arcade> --data_dir=<data_dir>
    """

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": common.grey_image_feature("the angiogram, 8-bit grey"),
            "file_name": tfds.features.Text(),
            "image_id": tfds.features.Scalar(np.int64, doc="COCO image id"),
        }
        if self.builder_config.name == "stenosis":
            features["mask"] = common.grey_image_feature("stenosis regions {0,1}")
        else:
            features["segment_mask"] = common.grey_image_feature("SYNTAX segment id per pixel, 0 = background")
            features["vessel_mask"] = common.grey_image_feature("union of the 25 segments {0,1}")
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            homepage="https://doi.org/10.5281/zenodo.10390295",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        config = self.options
        name = f"arcade/{config.name}"
        root = Path(dl_manager.manual_dir)
        kept, skipped = {}, []
        for split, (img_dir, ann_path) in find_splits(root, config.name).items():
            coco = json.loads(ann_path.read_text())
            by_image = {}
            for ann in coco.get("annotations", []):
                by_image.setdefault(ann["image_id"], []).append(ann)
            entries = sorted(coco["images"], key=lambda im: im["id"])
            common.check_unique([e["file_name"] for e in entries], f"{name} {split}")
            items = [(str(img_dir / e["file_name"]), int(e["height"]), int(e["width"])) for e in entries]
            good, bad = common.check_all(items, _check_image, config, f"{name} {split}")
            skipped += bad
            ok = {g[0][0] for g in good}
            kept[split] = [(e, str(img_dir / e["file_name"]), by_image.get(e["id"], [])) for e in entries
                           if str(img_dir / e["file_name"]) in ok]
        self.require_examples({s: len(e) for s, e in kept.items()}, root, bad=len(skipped))
        self.info.metadata.update(common.bad_metadata(skipped, [], root))
        return {split: self._generate_examples(entries, split) for split, entries in kept.items()}

    def _generate_examples(self, entries, split):
        task = self.builder_config.name
        for entry, path, anns in entries:
            img = images.read_image(path)
            mask = rasterise(anns, img.shape, task)
            example = {"image": images.png_bytes(img), "file_name": entry["file_name"], "image_id": entry["id"]}
            if task == "stenosis":
                example["mask"] = images.png_bytes(mask)
            else:
                example["segment_mask"] = images.png_bytes(mask)
                example["vessel_mask"] = images.png_bytes((mask > 0).astype(np.uint8))
            yield f"{split}/{entry['file_name']}", example
