"""Specification of the synthetic angiogram generator and of the realism metrics it is tuned with.

Realism bands (vasomim_jax.synthetic_metrics.BANDS; real CIMAT mean +- std in REAL_CIMAT), checked on the mean
of 16 synthetic 300 px images:
  vessel_fraction [0.04, 0.075]   (real 0.055 +- 0.016)
  cnr             [1.3, 3.0]      (real 2.04 +- 1.38)
  frangi_auc      [0.82, 0.92]    (real 0.867 +- 0.070; frangi sigmas 1-4, black ridges)
  branch_points   [4, 12], and >= MIN_BRANCH_POINTS = 2 in every image (real 5.7 +- 3.1, min 1)
  taper           [-0.8, -0.3]    (Spearman radius vs geodesic distance from the root; real -0.52 +- 0.23)
  relief          [0.06, 0.18]    (real 0.118 +- 0.073)
  noise           [0.008, 0.018]  (real 0.0123 +- 0.0043)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import ndimage

from vasomim_jax import synthetic, synthetic_metrics as sm

REALISM_SEEDS = range(1000, 1016)


# --- determinism, shapes, dtypes, bad input ---------------------------------------------------------------


def test_same_seed_gives_identical_frames_and_different_seeds_differ():
    a_img, a_mask = synthetic.angiogram(7, 96)
    b_img, b_mask = synthetic.angiogram(7, 96)
    c_img, c_mask = synthetic.angiogram(8, 96)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("size", [64, 257, 1024])
def test_shapes_dtypes_and_binary_mask(size):
    img, mask = synthetic.angiogram(3, size)
    assert img.shape == mask.shape == (size, size)
    assert img.dtype == np.uint8 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert img.max() > 128  # bright frame, not a dark or empty one


def test_uint16_is_the_same_frame_over_the_full_16_bit_range():
    img8, mask8 = synthetic.angiogram(5, 128)
    img16, mask16 = synthetic.angiogram(5, 128, dtype=np.uint16)
    assert img16.dtype == np.uint16 and img16.max() > 255 * 64
    np.testing.assert_array_equal(mask8, mask16)
    # Both quantise one float image: they differ by at most the two rounding steps.
    assert np.abs(img16 / 65535.0 - img8 / 255.0).max() <= 0.5 / 255 + 0.5 / 65535 + 1e-12


def test_batched_variant_stacks_single_frames_and_int_means_range():
    imgs, masks = synthetic.angiograms([4, 2], 64)
    assert imgs.shape == masks.shape == (2, 64, 64)
    for k, seed in enumerate([4, 2]):
        img, mask = synthetic.angiogram(seed, 64)
        np.testing.assert_array_equal(imgs[k], img)
        np.testing.assert_array_equal(masks[k], mask)
    imgs3, _ = synthetic.angiograms(3, 64, dtype=np.uint16)
    assert imgs3.dtype == np.uint16
    np.testing.assert_array_equal(imgs3[2], synthetic.angiogram(2, 64, dtype=np.uint16)[0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: synthetic.angiogram(0, 63), "size"),
        (lambda: synthetic.angiogram(0, 1025), "size"),
        (lambda: synthetic.angiogram(0, 256.0), "size"),
        (lambda: synthetic.angiogram(-1), "seed"),
        (lambda: synthetic.angiogram(0, 64, dtype=np.float32), "dtype"),
        (lambda: synthetic.angiogram(0, 64, dtype="not a dtype"), "dtype"),
        (lambda: synthetic.angiograms([], 64), "seeds"),
        (lambda: synthetic.SyntheticParams(labelled_generations=0), "labelled_generations"),
        (lambda: synthetic.SyntheticParams(taper=(0.9, 0.5)), "taper"),
        (lambda: synthetic.SyntheticParams(children=((1, 2),)), "children"),
        (lambda: synthetic.SyntheticParams(children=((2, 1), (0, 2), (3, 7))), "children"),
        (lambda: synthetic.SyntheticParams(twig_generations=-1), "twig_generations"),
        (lambda: synthetic.SyntheticParams(catheter_probability=1.5), "catheter_probability"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- anatomy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vessels_are_darker_than_their_surroundings(seed):
    img, mask = synthetic.angiogram(seed, 200)
    assert sm.cnr(img, mask) > 0


@settings(max_examples=20, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(64, 160))
def test_any_frame_is_binary_masked_and_its_vessels_only_darken_it(seed, size):
    img, mask = synthetic.angiogram(seed, size)
    assert img.shape == mask.shape == (size, size) and set(np.unique(mask)) <= {0, 1} and mask.any()
    # The same frame with transparent vessels (every other random draw is unchanged).
    clear = dataclasses.replace(synthetic.DEFAULT_PARAMS, vessel_mu=(0.0, 0.0))
    img0, mask0 = synthetic.angiogram(seed, size, params=clear)
    np.testing.assert_array_equal(mask, mask0)
    assert img0[mask > 0].astype(float).mean() > img[mask > 0].astype(float).mean()


def test_mask_is_the_lumen_of_the_labelled_tree():
    seed, size = 11, 160
    _, mask = synthetic.angiogram(seed, size)
    tree = synthetic.vessel_tree(seed, size)
    lab = [b for b in tree if b.labelled]
    centre = np.zeros((size, size), bool)
    for b in lab:
        ij = np.rint(b.points).astype(int)
        ok = ((ij >= 0) & (ij < size)).all(1)
        centre[ij[ok, 1], ij[ok, 0]] = True
    dist = ndimage.distance_transform_edt(~centre)
    r_max = max(b.radius.max() for b in lab)
    assert dist[mask > 0].max() <= r_max + 1.0
    assert mask[centre].mean() > 0.8  # the centre-lines are in the mask (the collimator may hide a few)


def test_radius_tapers_along_each_branch_and_from_generation_to_generation():
    for seed in range(6):
        tree = synthetic.vessel_tree(seed, 256)
        lab = [b for b in tree if b.labelled]
        assert {b.generation for b in lab} == set(range(synthetic.DEFAULT_PARAMS.labelled_generations))
        for b in lab:
            assert np.all(np.diff(b.radius) <= 1e-12), "radius must not grow along a branch"
        by_gen = [np.mean([b.radius.mean() for b in lab if b.generation == g]) for g in range(3)]
        assert by_gen[0] > by_gen[1] > by_gen[2], (seed, by_gen)
        twigs = [b for b in tree if not b.labelled]
        assert twigs and max(b.radius.max() for b in twigs) < by_gen[0]


def test_catheter_appears_in_a_fraction_of_frames_and_stays_out_of_the_mask():
    no_catheter = dataclasses.replace(synthetic.DEFAULT_PARAMS, catheter_probability=0.0)
    always = dataclasses.replace(synthetic.DEFAULT_PARAMS, catheter_probability=1.0)
    seeds = range(48)
    with_tube = 0
    for seed in seeds:
        img, mask = synthetic.angiogram(seed, 64)
        img0, mask0 = synthetic.angiogram(seed, 64, params=no_catheter)
        np.testing.assert_array_equal(mask, mask0)  # the catheter never enters the mask
        with_tube += not np.array_equal(img, img0)
    assert 0.15 <= with_tube / len(seeds) <= 0.55  # default probability 0.35
    # The tube: a long region darkened only by the catheter, reaching the image border.
    img1, mask1 = synthetic.angiogram(5, 200, params=always)
    img0, mask0 = synthetic.angiogram(5, 200, params=no_catheter)
    np.testing.assert_array_equal(mask1, mask0)
    darker = (img0.astype(int) - img1.astype(int)) > 8
    lab, n = ndimage.label(darker)
    assert n >= 1
    tube = lab == 1 + np.argmax(np.bincount(lab.ravel())[1:])
    assert tube.sum() > 200
    assert tube[0].any() or tube[-1].any() or tube[:, 0].any() or tube[:, -1].any()


# --- metrics: exact against references ----------------------------------------------------------------------


def test_roc_auc_equals_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 300).astype(float)  # many ties
    label = rng.uniform(size=300) < 0.3
    pos, neg = score[label], score[~label]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert sm.roc_auc(score, label) == pytest.approx(pairwise, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        sm.roc_auc(score, np.zeros(300, bool))


def test_branch_points_count_each_junction_once():
    plus = np.zeros((41, 41), np.uint8)
    plus[20, 5:36] = plus[5:36, 20] = 1
    plus = ndimage.binary_dilation(plus, iterations=1).astype(np.uint8)
    assert sm.branch_points(plus) == 1
    line = np.zeros((41, 41), np.uint8)
    line[19:22, 5:36] = 1
    assert sm.branch_points(line) == 0
    two = np.zeros((41, 61), np.uint8)
    two[20, 5:56] = two[5:20, 20] = two[21:36, 40] = 1
    assert sm.branch_points(two) == 2


def test_taper_is_negative_for_a_tube_thinning_away_from_its_thick_end():
    yy, xx = np.mgrid[0:40, 0:200]
    radius = 6.0 - 5.0 * xx / 200.0
    tube = (np.abs(yy - 20) <= radius) & (xx >= 5) & (xx < 195)
    assert sm.taper(tube.astype(np.uint8)) < -0.9


# --- realism against the real CIMAT angiograms ------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_metrics():
    images, masks = synthetic.angiograms(REALISM_SEEDS, 300)
    return sm.measure(images, masks)


@pytest.fixture(scope="module")
def real_metrics():
    root = sm.real_data_dir() / "cimat_xca80"
    if not root.is_dir():
        pytest.skip(f"real CIMAT angiograms not found at {root} (set VASOMIM_REAL_DATA)")
    return sm.measure(*sm.load_cimat())


@pytest.mark.parametrize("name", sorted(sm.BANDS))
def test_synthetic_mean_lies_in_the_realism_band(synthetic_metrics, name):
    lo, hi = sm.BANDS[name]
    assert lo <= np.nanmean(synthetic_metrics[name]) <= hi


@pytest.mark.parametrize("name", sorted(sm.BANDS))
def test_bands_are_anchored_on_the_measured_real_images(real_metrics, name):
    mean, std = sm.REAL_CIMAT[name]
    assert np.nanmean(real_metrics[name]) == pytest.approx(mean, rel=2e-3)
    assert np.nanstd(real_metrics[name]) == pytest.approx(std, rel=2e-3)
    lo, hi = sm.BANDS[name]
    assert lo <= mean <= hi


def test_every_synthetic_frame_is_a_branching_tree_on_a_textured_background(synthetic_metrics):
    assert synthetic_metrics["branch_points"].min() >= sm.MIN_BRANCH_POINTS
    assert np.all(synthetic_metrics["relief"] > 0.02)
    assert np.all(synthetic_metrics["taper"] < 0)


def test_synthetic_frangi_auc_is_realistic_not_trivial(synthetic_metrics):
    auc = synthetic_metrics["frangi_auc"]
    assert auc.max() < 0.99  # a trivially separable image would sit at ~1
    assert auc.std() > 0.02  # frames vary in difficulty as real ones do
