"""The `synthetic_angio` TFDS builder (importing this package registers it)."""

from tfds_builders.synthetic_angio.synthetic_angio_dataset_builder import Builder

__all__ = ["Builder"]
