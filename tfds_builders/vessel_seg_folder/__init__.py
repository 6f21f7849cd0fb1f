"""The `vessel_seg_folder` TFDS builder (importing this package registers it)."""

from tfds_builders.vessel_seg_folder.vessel_seg_folder_dataset_builder import Builder

__all__ = ["Builder"]
