"""The official XA-SSL vessel-map recipe: device path vs the skimage recipe, percentile, region growing, bad input."""

import os
import pathlib

import numpy as np
import pytest
import skimage.filters
from PIL import Image

from vasomim_jax import synthetic
from vasomim_jax.vesselness import vessel_map, vessel_maps
from vasomim_jax.vesselness_maps import grow_from_argmax, percentile_uint8, published_flood_fill, published_recipe

REAL = pathlib.Path(os.environ.get("VASOMIM_REAL_DATA", pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
ARCADE = REAL / "arcade_stenosis_test" / "images"
needs_arcade = pytest.mark.skipif(not ARCADE.is_dir(), reason=f"real angiograms not found at {ARCADE} (set VASOMIM_REAL_DATA)")


def reference_recipe(image: np.ndarray, border=20, percentile=92.0) -> np.ndarray:
    return published_recipe(image, border=border, percentile=percentile)[1]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_percentile_from_histograms_equals_numpy():
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 256, (5, 37, 41), dtype=np.uint8)
    maps[1] = np.where(rng.random((37, 41)) < 0.9, 0, maps[1])  # mostly zero, like vesselness maps
    maps[2] = 0
    maps[3] = 255
    for q in (0.0, 50.0, 92.0, 99.9, 100.0):
        expected = np.array([np.percentile(m, q) for m in maps])
        np.testing.assert_array_equal(percentile_uint8(maps, q), expected)


def test_label_based_region_growing_equals_the_published_flood_fill():
    rng = np.random.default_rng(1)
    kept = np.where(rng.random((6, 40, 50)) < 0.45, rng.integers(1, 256, (6, 40, 50)), 0).astype(np.uint8)
    kept[4] = 0  # all-zero map -> empty mask
    kept[5, 7, 9] = kept[5, 30, 30] = 255  # tie for the maximum: the first in C order seeds
    grown = grow_from_argmax(kept)
    assert grown.dtype == np.uint8
    for i in range(len(kept)):
        np.testing.assert_array_equal(grown[i], published_flood_fill(kept[i]), err_msg=f"map {i}")


def test_device_path_matches_the_recipe_on_synthetic_angiograms():
    images, _ = synthetic.angiograms(range(3), size=96)
    ours = vessel_map(images, border=10)
    assert ours.dtype == np.uint8 and ours.shape == images.shape and set(np.unique(ours)) <= {0, 1}
    for image, got in zip(images, ours):
        assert iou(got, reference_recipe(image, border=10)) >= 0.99
    single = vessel_map(images[0], border=10)
    np.testing.assert_array_equal(single, ours[0])


def test_blank_images_give_empty_maps():
    images = np.stack([np.zeros((64, 64), np.uint8), np.full((64, 64), 200, np.uint8)])
    for backend in ("jax", "skimage"):
        assert not vessel_map(images, backend=backend).any()


def test_default_path_never_calls_skimage(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("skimage.filters was called on the default path")

    monkeypatch.setattr(skimage.filters, "sato", forbidden)
    monkeypatch.setattr(skimage.filters, "frangi", forbidden)
    images, _ = synthetic.angiograms(range(2), size=64)
    assert vessel_map(images[0]).shape == (64, 64)
    assert len(vessel_maps(list(images), filter="frangi")) == 2
    with pytest.raises(AssertionError, match="default path"):
        vessel_map(images[0], backend="skimage")


def test_vessel_maps_batches_mixed_sizes_and_keeps_order():
    images, _ = synthetic.angiograms(range(4), size=64)
    mixed = [images[0], images[1][:48, :56], images[2], images[3][:48, :56], images[1]]
    maps = vessel_maps(mixed, batch_size=2, border=5)
    assert [m.shape for m in maps] == [im.shape for im in mixed]
    for image, got in zip(mixed, maps):
        np.testing.assert_array_equal(got, vessel_map(image, border=5))


@needs_arcade
def test_vessel_maps_match_the_skimage_recipe_on_30_arcade_images():
    paths = sorted(ARCADE.glob("*.png"))[::10][:30]
    images = [np.array(Image.open(p).convert("L")) for p in paths]
    ours = vessel_maps(images)
    scores = [iou(got, reference_recipe(image)) for image, got in zip(images, ours)]
    worst = int(np.argmin(scores))
    assert scores[worst] >= 0.99, f"worst IoU {scores[worst]:.4f} on {paths[worst].name}"
    assert np.mean(scores) >= 0.995, f"mean IoU {np.mean(scores):.4f}"
    np.testing.assert_array_equal(vessel_map(images[0], backend="skimage"), reference_recipe(images[0]))


def test_bad_input_is_rejected_with_the_argument_named():
    image = np.zeros((32, 32), np.uint8)
    with pytest.raises(TypeError, match="image_uint8 must have dtype uint8"):
        vessel_map(image.astype(np.float32))
    with pytest.raises(ValueError, match="filter"):
        vessel_map(image, filter="meijering")
    with pytest.raises(ValueError, match="backend"):
        vessel_map(image, backend="torch")
    with pytest.raises(ValueError, match="border"):
        vessel_map(image, border=-1)
    with pytest.raises(ValueError, match="percentile"):
        vessel_map(image, percentile=120.0)
    with pytest.raises(ValueError, match="image_uint8 must be"):
        vessel_map(np.zeros((2, 2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        vessel_map(np.zeros((0, 8), np.uint8))
    with pytest.raises(ValueError, match=r"images\[1\] must be \(H, W\)"):
        vessel_maps([image, np.zeros((2, 8, 8), np.uint8)])
    with pytest.raises(TypeError, match="unknown keyword"):
        vessel_maps([image], sigma=(1, 2))
    with pytest.raises(ValueError, match="batch_size"):
        vessel_maps([image], batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        vessel_maps([image], backend="torch")
