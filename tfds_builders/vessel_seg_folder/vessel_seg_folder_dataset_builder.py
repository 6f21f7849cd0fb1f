"""Image + ground-truth vessel mask pairs (optionally a field-of-view mask) for segmentation fine-tuning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from tfds_builders import common, images


@dataclasses.dataclass(eq=False)
class PairingConfig(common.VasoConfig):
    """The pairing rule: `<mask_dir>/<sub>/<image stem><mask_suffix>.<any image extension>` for
    `<image_dir>/<sub>/<image stem>.<ext>`; the same for the optional field-of-view masks."""

    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = "_gt"
    fov_dir: str = ""  # "" = no field-of-view masks
    fov_suffix: str = ""


def split_of(rel: Path) -> str:
    """training|train → train, testing|test → test, val|validation → validation; a flat layout → train."""
    return common.SPLIT_FOLDERS.get(rel.parts[0].lower(), "train") if len(rel.parts) > 1 else "train"


def find_partner(folder: Path, rel: Path, suffix: str) -> Path | None:
    stem = rel.with_suffix("").name + suffix
    matches = sorted(p for p in (folder / rel.parent).glob(f"{stem}.*") if images.is_image_path(p, dicom=False))
    return matches[0] if matches else None


def _check_pair(item: tuple[str, str, str]) -> tuple[int, int] | images.BadFileError:
    image, mask, fov = item
    try:
        shape = images.read_image(image).shape
        common.read_binary_mask(mask, shape)
        if fov:
            common.read_binary_mask(fov, shape)
        return shape
    except images.BadFileError as e:
        return e


class Builder(common.VasoBuilder):
    """Vessel segmentation pairs from folders (e.g. CIMAT/XCA: images/training/1.png + masks/training/1_gt.png)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PairingConfig(name="default", description="images/ + masks/<stem>_gt.*, no field of view."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Lay the pairs out as <manual_dir>/images/<sub>/<name>.<ext> and <manual_dir>/masks/<sub>/<name>_gt.<ext>
    (any image extension for either, .pgm and .gif included; masks {0,1} or {0,255}, binarised at > 127).
    <sub> = training|train, testing|test, val|validation name the split; without sub-folders all is `train`.
    Other folder names / suffix / a field-of-view folder: give them as config fields, e.g.
      tfds build tfds_builders/vessel_seg_folder --config='{"name": "drive", "mask_suffix": "_manual1", ...}'
    """

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": common.grey_image_feature("the angiogram, 8-bit grey"),
            "mask": common.grey_image_feature("ground-truth vessels {0,1}"),
            "file_name": tfds.features.Text(doc="image path relative to the image folder"),
        }
        if self.builder_config.fov_dir:
            features["fov"] = common.grey_image_feature("field of view {0,1}")
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features),
                                              metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        c: PairingConfig = self.options
        root = Path(dl_manager.manual_dir)
        img_root, mask_root = root / c.image_dir, root / c.mask_dir
        for field, folder in (("image_dir", img_root), ("mask_dir", mask_root)) + (
                (("fov_dir", root / c.fov_dir),) if c.fov_dir else ()):
            if not folder.is_dir():
                raise FileNotFoundError(f"vessel_seg_folder/{c.name}: config field {field}={folder.name!r}: "
                                        f"no folder {folder}")
        files, ignored = images.scan_tree(img_root, dicom=False)
        rels = [p.relative_to(img_root) for p in files]
        # The key is split/sub-path/stem: two images of one stem would claim the same mask.
        common.check_unique([str(r.with_suffix("")) for r in rels], f"vessel_seg_folder/{c.name}")
        items, bad = [], []
        for rel in rels:
            mask = find_partner(mask_root, rel, c.mask_suffix)
            fov = find_partner(root / c.fov_dir, rel, c.fov_suffix) if c.fov_dir else None
            missing = "mask" if mask is None else ("field-of-view mask" if c.fov_dir and fov is None else "")
            if missing:
                bad.append(images.BadFileError(str(img_root / rel), f"no {missing} {rel.with_suffix('').name}"
                                               f"{c.mask_suffix if missing == 'mask' else c.fov_suffix}.*"))
                continue
            items.append((str(img_root / rel), str(mask), str(fov or "")))
        # Collect the undecodable files too before failing: the error lists every bad file at once.
        good, bad_decode = common.check_all(items, _check_pair, dataclasses.replace(c, skip_bad_files=True),
                                            f"vessel_seg_folder/{c.name}")
        if (bad or bad_decode) and not c.skip_bad_files:
            raise common.BadFilesError(f"vessel_seg_folder/{c.name}", bad + bad_decode)
        self.info.metadata.update(common.bad_metadata(bad + bad_decode, ignored, root))
        splits = {split_of(rel): [] for rel in rels}
        for (image, mask, fov), _ in good:
            rel = Path(image).relative_to(img_root)
            splits[split_of(rel)].append((str(rel), image, mask, fov))
        self.require_examples({s: len(e) for s, e in splits.items()}, root, bad=len(bad + bad_decode),
                              ignored=len(ignored))
        return {split: self._generate_examples(entries) for split, entries in sorted(splits.items())}

    def _generate_examples(self, entries):
        for rel, image, mask, fov in entries:
            img = images.read_image(image)
            example = {"image": images.png_bytes(img), "file_name": rel,
                       "mask": images.png_bytes(common.read_binary_mask(mask, img.shape))}
            if fov:
                example["fov"] = images.png_bytes(common.read_binary_mask(fov, img.shape))
            yield str(Path(rel).with_suffix("")), example
