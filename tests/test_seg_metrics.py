"""Dice and clDice on hand-computed masks, with the issue's edge cases."""

import numpy as np
import pytest
from skimage.morphology import skeletonize

from vasomim_jax.finetune import seg_metrics


def capsule() -> np.ndarray:
    """A 3-px-wide bar with cut corners (23 px) whose skimage skeleton is row 3, columns 2..8 (7 px)."""
    m = np.zeros((7, 11), bool)
    m[2:5, 1:10] = True
    m[2, 1] = m[4, 1] = m[2, 9] = m[4, 9] = False
    return m


def line(c0: int, c1: int) -> np.ndarray:
    """A 1-px horizontal line on row 3, columns c0..c1-1 (its own skeleton)."""
    m = np.zeros((7, 11), bool)
    m[3, c0:c1] = True
    return m


def test_fixtures_have_the_stated_skeletons():
    expected = np.zeros((7, 11), bool)
    expected[3, 2:9] = True
    assert capsule().sum() == 23
    np.testing.assert_array_equal(skeletonize(capsule()), expected)
    np.testing.assert_array_equal(skeletonize(line(1, 10)), line(1, 10))


def test_thick_prediction_of_a_centreline_has_low_dice_but_perfect_cldice():
    # P = capsule (23 px), G = its 9-px centre line: Dice = 2*9/(23+9); Tprec = 7/7, Tsens = 9/9.
    assert seg_metrics.dice(capsule(), line(1, 10)) == pytest.approx(18 / 32)
    assert seg_metrics.cldice(capsule(), line(1, 10)) == pytest.approx(1.0)


def test_partial_centreline_prediction():
    # P = row 3, cols 1..4 (4 px), G = capsule: Dice = 8/27; Tprec = 4/4, Tsens = |{2,3,4}|/7 = 3/7
    # -> clDice = 2 * (3/7) / (1 + 3/7) = 0.6.
    assert seg_metrics.dice(line(1, 5), capsule()) == pytest.approx(8 / 27)
    assert seg_metrics.cldice(line(1, 5), capsule()) == pytest.approx(0.6)


def test_partial_line_against_full_line():
    # P = 4 of G's 7 px: Dice = 8/11; Tprec = 1, Tsens = 4/7 -> clDice = 8/11.
    assert seg_metrics.dice(line(1, 5), line(1, 8)) == pytest.approx(8 / 11)
    assert seg_metrics.cldice(line(1, 5), line(1, 8)) == pytest.approx(8 / 11)


def test_disjoint_non_empty_masks_score_zero():
    p, g = line(0, 3), line(6, 10)
    assert seg_metrics.dice(p, g) == 0.0
    assert seg_metrics.cldice(p, g) == 0.0


def test_both_empty_scores_one():
    z = np.zeros((5, 5), np.uint8)
    assert seg_metrics.dice(z, z) == 1.0
    assert seg_metrics.cldice(z, z) == 1.0


@pytest.mark.parametrize("pred_empty", [True, False])
def test_exactly_one_empty_scores_zero(pred_empty):
    z, m = np.zeros((7, 11), bool), capsule()
    p, g = (z, m) if pred_empty else (m, z)
    assert seg_metrics.dice(p, g) == 0.0
    assert seg_metrics.cldice(p, g) == 0.0


def test_uint8_0_255_masks_count_as_binary():
    assert seg_metrics.dice(capsule().astype(np.uint8) * 255, line(1, 10).astype(np.uint8)) == pytest.approx(18 / 32)


def test_scores_per_image_and_shape_errors():
    s = seg_metrics.scores([capsule(), line(1, 5)], [line(1, 10), capsule()])
    np.testing.assert_allclose(s["dice"], [18 / 32, 8 / 27])
    np.testing.assert_allclose(s["cldice"], [1.0, 0.6])
    with pytest.raises(ValueError, match="pred shape"):
        seg_metrics.dice(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2 predictions for 1"):
        seg_metrics.scores([capsule(), capsule()], [capsule()])
