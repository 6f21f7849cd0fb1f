"""Any folder tree of angiograms → image + binary vessel map (computed with the official offline recipe)."""

from __future__ import annotations

from pathlib import Path

from tfds_builders import common, images


def find_sources(root: Path) -> tuple[list[images.Source], list[Path]]:
    """Every image under `root` (DICOM too); `source` is the top-level folder (the root's name for its files)."""
    files, ignored = images.scan_tree(root)
    sources = []
    for path in files:
        rel = path.relative_to(root)
        source = rel.parts[0] if len(rel.parts) > 1 else root.name
        sources.append(images.Source(str(path), str(rel), source))
    return sources, ignored


class Builder(common.FolderPretrainBuilder):
    """Angiograms from any folder tree, with their vessel maps, for pre-training."""

    find_sources = staticmethod(find_sources)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Point --manual_dir at any folder of X-ray angiograms (sub-folders allowed; the top-level folder name becomes
    the `source` feature). Read: PNG, JPEG, TIFF, BMP, PGM, GIF (8- or 16-bit, grey or RGB) and, when pydicom is
    installed, DICOM (.dcm / .dicom; one example per frame of a multi-frame cine file, `file_name` then ends in
    `#<frame>`). 16-bit and DICOM images are windowed to 8 bits: the DICOM VOI LUT or WindowCenter/Width when
    present, else the 0.5-99.5 percentiles. Other files (README, .txt, .json, hidden files) are ignored.
      vasomim convert angio_folder --manual_dir=<folder> --data_dir=<data_dir>
    """
