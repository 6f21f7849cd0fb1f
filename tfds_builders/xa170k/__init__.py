"""The `xa170k` TFDS builder (importing this package registers it)."""

from tfds_builders.xa170k.xa170k_dataset_builder import Builder

__all__ = ["Builder"]
