"""Seeded synthetic angiograms (vasomim_jax.synthetic) with their vessel maps and ground-truth vessel masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from tfds_builders import common, images


@dataclasses.dataclass(eq=False)
class SyntheticConfig(common.VasoConfig):
    num_images: int = 512
    image_size: int = 96


def _loaded(seed: int, size: int) -> tuple[common.Loaded, np.ndarray]:
    from vasomim_jax import synthetic

    image, mask = synthetic.angiogram(seed, size)
    name = f"synthetic/{seed:06d}"
    return common.Loaded(name, "synthetic", name, image, images.png_bytes(image), None), mask


class Builder(common.VasoBuilder):
    """Synthetic angiograms: `small` (default) builds in seconds for tests and the demo; `large` for benchmarks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        # The demo trains 64 px RandomResizedCrops from these 96 px images. A 20 px border would blank 42 % of a
        # 96 px map, so the small config zeroes 4 px; the rest of the recipe is the official one.
        SyntheticConfig(name="small", num_images=512, image_size=96, map_border=4,
                        description="512 images of 96x96 (seeds 0-511), map border 4 px."),
        SyntheticConfig(name="large", num_images=5000, image_size=256, map_border=20,
                        description="5,000 images of 256x256 (seeds 0-4999), official map recipe."),
    ]
    DEFAULT_CONFIG_NAME = "small"

    def _info(self) -> tfds.core.DatasetInfo:
        features = dict(common.pretrain_features())
        features["gt_mask"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png",
                                                  doc="ground-truth vessel mask {0,1} of the generator")
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        from vasomim_jax import synthetic

        c: SyntheticConfig = self.builder_config
        if c.num_images <= 0 or not synthetic.MIN_SIZE <= c.image_size <= synthetic.MAX_SIZE:
            raise ValueError(f"synthetic_angio/{c.name}: config fields num_images must be > 0 and image_size in "
                             f"[{synthetic.MIN_SIZE}, {synthetic.MAX_SIZE}], got {c.num_images} and {c.image_size}")
        self.info.metadata.update({
            "num_images_per_source": {"synthetic": c.num_images},
            "num_maps_computed": c.num_images,
            "map_recipe": dataclasses.asdict(common.Recipe.from_config(c)),
        })
        return {"train": self._generate_examples(range(c.num_images))}

    def _generate_examples(self, seeds):
        c: SyntheticConfig = self.builder_config
        recipe = common.Recipe.from_config(c)
        seeds = list(seeds)
        for start in range(0, len(seeds), common.CHUNK):
            pairs = [_loaded(s, c.image_size) for s in seeds[start:start + common.CHUNK]]
            examples = common.examples_from_loaded([p[0] for p in pairs], recipe)
            for (key, example), (_, mask) in zip(examples, pairs):
                yield key, {**example, "gt_mask": images.png_bytes(mask.astype(np.uint8))}
