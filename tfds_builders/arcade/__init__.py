"""The `arcade` TFDS builder (importing this package registers it)."""

from tfds_builders.arcade.arcade_dataset_builder import Builder

__all__ = ["Builder"]
