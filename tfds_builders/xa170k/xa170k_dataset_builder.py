"""XA-170K: the VasoMIM pre-training corpus (CADICA, SYNTAX, XCAD, CoronaryDominance) with binary vessel maps."""

from __future__ import annotations

from pathlib import Path

from tfds_builders import common, images

SOURCES = ("cadica", "syntax", "xcad", "coronarydominance")
# Map folders, in order of preference: the published name, then the one the authors' loader reads.
MAP_SUFFIXES = ("_frangi", "_filter_92")


def find_sources(root: Path, *, dicom: bool = True) -> tuple[list[images.Source], list[Path]]:
    """`<source>/` image trees with maps of the same relative path in `<source>_frangi/` (or `_filter_92/`).

    A map file that is present is used; a missing one is computed. Everything outside the source and map
    folders is ignored (and counted).
    """
    present = [s for s in SOURCES if (root / s).is_dir()]
    if not present:
        raise FileNotFoundError(
            f"xa170k: none of the source folders {', '.join(s + '/' for s in SOURCES)} is in the manual_dir "
            f"{root}.\n{Builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    sources, ignored = [], []
    used_dirs = set(present)
    for name in present:
        map_dirs = [root / (name + sfx) for sfx in MAP_SUFFIXES if (root / (name + sfx)).is_dir()]
        if len(map_dirs) > 1:
            raise ValueError(f"xa170k: both {map_dirs[0]} and {map_dirs[1]} exist; keep one map folder per source")
        map_dir = map_dirs[0] if map_dirs else None
        if map_dir:
            used_dirs.add(map_dir.name)
        files, other = images.scan_tree(root / name, dicom=dicom)
        ignored += other
        for path in files:
            rel = path.relative_to(root / name)
            map_path = map_dir / rel if map_dir and (map_dir / rel).is_file() else None
            sources.append(images.Source(str(path), str(path.relative_to(root)), name,
                                         str(map_path) if map_path else ""))
        if map_dir:  # map files that pair with no image are not silently dropped: they count as ignored
            names = {str(p.relative_to(root / name)) for p in files}
            ignored += [p for p in images.scan_tree(map_dir)[0] if str(p.relative_to(map_dir)) not in names]
    for path in sorted(root.iterdir()):
        if path.name not in used_dirs:
            ignored += [path] if not path.is_dir() else [p for found in images.scan_tree(path) for p in found]
    return sources, ignored


class Builder(common.FolderPretrainBuilder):
    """XA-170K (171,478 X-ray angiograms) with the vessel maps VasoMIM's masking samples from."""

    find_sources = staticmethod(find_sources)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download XA-170K as published by the VasoMIM authors (github.com/Dxhuang-CASIA/XA-SSL, "Dataset" section:
    the release links to the four sub-corpora and to their precomputed vessel maps) and lay it out as:

      <manual_dir>/cadica/...             images (any sub-folders; PNG/JPEG/TIFF/BMP, or DICOM)
      <manual_dir>/cadica_frangi/...      optional binary maps, same relative paths and file names as the images
      <manual_dir>/syntax/  syntax_frangi/
      <manual_dir>/xcad/    xcad_frangi/
      <manual_dir>/coronarydominance/  coronarydominance_frangi/

    A map folder may also be named `<source>_filter_92/` (the name the authors' loader reads). Maps may be {0,1}
    or {0,255}; missing maps are computed with the official recipe (vasomim_jax.vesselness.vessel_map).
    Sources may be absent (they are then not in the dataset). Then run
      vasomim convert xa170k --manual_dir=<manual_dir> --data_dir=<data_dir>
    """
