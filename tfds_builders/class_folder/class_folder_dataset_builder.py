"""`<split>/<label>/<image>` folders → image classification examples (e.g. stenosis crops)."""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from tfds_builders import common, images


def find_examples(root: Path) -> tuple[dict[str, list[tuple[str, Path]]], list[str], list[Path]]:
    """({split: [(label, path)]}, sorted labels, ignored files). Split folders: train|training, test|testing,
    val|validation; label folders directly below them; images directly in the label folders."""
    files, ignored = images.scan_tree(root, dicom=False)
    by_split: dict[str, list[tuple[str, Path]]] = {}
    for path in files:
        rel = path.relative_to(root)
        split = common.SPLIT_FOLDERS.get(rel.parts[0].lower()) if len(rel.parts) == 3 else None
        if split is None:
            ignored.append(path)
            continue
        by_split.setdefault(split, []).append((rel.parts[1], path))
    labels = sorted({label for entries in by_split.values() for label, _ in entries})
    if not labels:
        raise FileNotFoundError(f"class_folder: no <split>/<label>/<image> files under {root}.\n"
                                f"{Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return by_split, labels, ignored


def _check(path: str) -> tuple[int, int] | images.BadFileError:
    try:
        return images.read_image(path).shape
    except images.BadFileError as e:
        return e


class Builder(common.VasoBuilder):
    """Image classification from `<split>/<label>/*` folders; label names are the sorted label folder names."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [common.VasoConfig(name="default", description="Labels from the folder names.")]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Lay the images out as <manual_dir>/<split>/<label>/<image> with <split> = train|training, test|testing,
    val|validation (PNG, JPEG, TIFF, BMP, PGM, GIF; stored as 8-bit grey). All splits share the label set.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": common.grey_image_feature("the image, 8-bit grey"),
                # The names come from the folders: set once the manual_dir has been read.
                "label": tfds.features.ClassLabel(),
                "file_name": tfds.features.Text(doc="path relative to the manual_dir"),
            }),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        by_split, labels, ignored = find_examples(root)
        self.info.features["label"].names = labels
        c = self.options
        kept, skipped = {}, []
        for split, entries in sorted(by_split.items()):
            good, bad = common.check_all([str(p) for _, p in entries], _check, c, f"class_folder {split}")
            skipped += bad
            ok = {g[0] for g in good}
            kept[split] = [(lab, p, root) for lab, p in entries if str(p) in ok]
        self.require_examples({s: len(e) for s, e in kept.items()}, root, bad=len(skipped), ignored=len(ignored))
        self.info.metadata.update(common.bad_metadata(skipped, ignored, root))
        return {split: self._generate_examples(entries) for split, entries in kept.items()}

    def _generate_examples(self, entries):
        for label, path, root in entries:
            rel = str(path.relative_to(root))
            yield rel, {"image": images.png_bytes(images.read_image(path)), "label": label, "file_name": rel}
