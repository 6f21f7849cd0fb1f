"""The `class_folder` TFDS builder (importing this package registers it)."""

from tfds_builders.class_folder.class_folder_dataset_builder import Builder

__all__ = ["Builder"]
