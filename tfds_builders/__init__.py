"""TFDS builders of vasomim-jax. `import tfds_builders` registers all of them with TFDS, so that
`tfds.builder("xa170k/r256")` or `tfds.data_source("synthetic_angio/small", ...)` find them.

Builders (each a `tfds new`-style package `tfds_builders/<name>/`):
  xa170k             the paper's pre-training corpus, image + vessel map (configs native, r256)
  angio_folder       any folder of angiograms (DICOM cine too), image + vessel map (native, r256)
  synthetic_angio    synthetic angiograms + vessel map + ground-truth mask (small, large)
  arcade             ARCADE COCO polygons: stenosis / syntax segmentation
  vessel_seg_folder  image + ground-truth mask pairs (segmentation fine-tuning)
  class_folder       <split>/<label>/* image classification
"""

from tfds_builders import angio_folder, arcade, class_folder, synthetic_angio, vessel_seg_folder, xa170k

__all__ = ["angio_folder", "arcade", "class_folder", "synthetic_angio", "vessel_seg_folder", "xa170k"]
