"""The `angio_folder` TFDS builder (importing this package registers it)."""

from tfds_builders.angio_folder.angio_folder_dataset_builder import Builder

__all__ = ["Builder"]
