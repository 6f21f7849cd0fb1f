"""Specification of the anatomy-guided masking (METHOD §3): the official algorithm's distribution, exactly."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vasomim_jax import masking

ALPHA = 1e-3  # family-wise false-alarm rate of every statistical test here


@pytest.fixture(scope="module")
def sample():
    """jitted guided_mask over a big batch: (scores (L,) or (B, L), n, beta, seed) → MaskResult of numpy arrays."""
    fn = jax.jit(masking.guided_mask, static_argnames=("mask_ratio",))

    def run(scores, n, beta, seed=0, mask_ratio=0.5):
        scores = np.broadcast_to(np.asarray(scores, np.float32), (n, np.shape(scores)[-1]))
        keys = jax.random.split(jax.random.key(seed), n)
        out = fn(keys, jnp.asarray(scores), mask_ratio=mask_ratio, beta=jnp.float32(beta))
        return masking.MaskResult(*map(np.asarray, out))

    return run


# ----------------------------------------------------------------------------------------------- references
def official_subset_distribution(scores, num_mask, beta, power=1.0, guided_rest=False):
    """Exact P(masked set) of XA-SSL's guided_masking, by enumeration (float64).

    n_g = min(int(num_mask·β), #{p>0}) drawn sequentially without replacement ∝ p (torch.multinomial), the rest
    uniformly from the remaining patches. ``power`` ≠ 1 (draw ∝ p^power) and ``guided_rest`` (the rest also ∝ p)
    are the wrong samplers used to check the tests' power.
    """
    s = np.asarray(scores, np.float64)
    p = s / (s.sum() + 1e-6)
    length = len(s)
    n_guided = min(int(num_mask * beta), int((p > 0).sum()))
    w = p ** power
    dist = {}
    for seq in itertools.permutations(np.flatnonzero(p > 0), n_guided):
        prob, left = 1.0, w.sum()
        for i in seq:
            prob *= w[i] / left
            left -= w[i]
        rest = [i for i in range(length) if i not in seq]
        m_rand = num_mask - n_guided
        if guided_rest:
            sub = official_subset_distribution(s[rest] + 1e-12, m_rand, 1.0)
            extra = {frozenset(rest[j] for j in k): v for k, v in sub.items()}
        else:
            combos = list(itertools.combinations(rest, m_rand))
            extra = {frozenset(c): 1.0 / len(combos) for c in combos}
        for c, q in extra.items():
            key = frozenset(seq) | c
            dist[key] = dist.get(key, 0.0) + prob * q
    return dist


def successive_sampling_inclusion(weights, sizes, n_draw):
    """Exact first-order inclusion probability per weight group of n_draw draws without replacement ∝ weight.

    Patches of a group are exchangeable, so a DP over how many of each group were drawn is exact.
    """
    states = {tuple(0 for _ in sizes): 1.0}
    for _ in range(n_draw):
        nxt = {}
        for counts, prob in states.items():
            left = [(k - c) * w for k, c, w in zip(sizes, counts, weights)]
            total = sum(left)
            for g, mass in enumerate(left):
                if mass > 0:
                    key = counts[:g] + (counts[g] + 1,) + counts[g + 1:]
                    nxt[key] = nxt.get(key, 0.0) + prob * mass / total
        states = nxt
    expected = np.zeros(len(sizes))
    for counts, prob in states.items():
        expected += prob * np.asarray(counts)
    return expected / np.asarray(sizes)


def subset_counts(mask, support):
    index = {s: i for i, s in enumerate(support)}
    counts = np.zeros(len(support))
    for row in mask.astype(bool):
        counts[index[frozenset(np.flatnonzero(row).tolist())]] += 1
    return counts


# --------------------------------------------------------------------------------------------- basic shape
@pytest.mark.parametrize("length, ratio, expected", [(196, 0.75, 147), (196, 0.5, 98), (6, 0.5, 3), (10, 0.33, 4)])
def test_num_masked_is_mae_formula(length, ratio, expected):
    assert masking.num_masked(length, ratio) == expected == length - int(length * (1 - ratio))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_exactly_num_mask_masked_and_ids_invert_the_shuffle(sample, beta):
    rng = np.random.default_rng(0)
    scores = rng.random((64, 49)) * (rng.random((64, 49)) < 0.3)
    scores[:4] = 0.0  # all-zero guidance → fully random
    out = sample(scores, 64, beta, mask_ratio=0.75)
    num_mask, len_keep = 49 - int(49 * 0.25), int(49 * 0.25)
    assert out.mask.dtype == np.float32 and out.ids_keep.shape == (64, len_keep)
    assert np.all(out.mask.sum(1) == num_mask)
    n_guided = np.minimum(int(num_mask * beta), (scores > 0).sum(1))
    np.testing.assert_array_equal(out.guided.sum(1), n_guided)
    assert not np.any(out.guided & (out.mask == 0)) and not np.any(out.guided & (scores == 0))
    # MAE: gather visible with ids_keep, append mask tokens, gather with ids_restore → original order.
    tokens = np.broadcast_to(np.arange(49), (64, 49))
    visible = np.take_along_axis(tokens, out.ids_keep, 1)
    restored = np.take_along_axis(np.concatenate([visible, np.full((64, num_mask), -1)], 1), out.ids_restore, 1)
    np.testing.assert_array_equal(restored, np.where(out.mask == 1, -1, tokens))


def test_mask_depends_only_on_the_examples_key(sample):
    scores = np.random.default_rng(1).random((8, 36))
    keys = jax.random.split(jax.random.key(3), 8)
    perm = np.array([5, 2, 7, 0, 1, 6, 3, 4])
    a = masking.guided_mask(keys, jnp.asarray(scores), mask_ratio=0.5, beta=0.5)
    b = masking.guided_mask(keys[perm], jnp.asarray(scores[perm]), mask_ratio=0.5, beta=0.5)
    np.testing.assert_array_equal(np.asarray(a.mask)[perm], b.mask)


def test_raw_and_typed_keys_give_the_same_mask():
    scores = jnp.asarray(np.random.default_rng(3).random((4, 16)))
    typed = jax.random.split(jax.random.key(5), 4)
    a = masking.guided_mask(typed, scores, mask_ratio=0.5, beta=0.5)
    b = masking.guided_mask(jax.random.key_data(typed), scores, mask_ratio=0.5, beta=0.5)
    np.testing.assert_array_equal(a.mask, b.mask)
    single = masking.guided_mask(jax.random.key(5), scores, mask_ratio=0.5, beta=0.5)  # split into 4
    np.testing.assert_array_equal(single.mask, a.mask)


def test_traced_beta_equals_python_beta():
    scores = jnp.asarray(np.random.default_rng(2).random((16, 49)))
    keys = jax.random.split(jax.random.key(0), 16)
    eager = masking.guided_mask(keys, scores, mask_ratio=0.5, beta=0.5)
    traced = jax.jit(lambda b: masking.guided_mask(keys, scores, mask_ratio=0.5, beta=b))(jnp.float32(0.5))
    for x, y in zip(eager, traced):
        np.testing.assert_array_equal(x, y)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.guided_mask(jax.random.key(0), jnp.ones((2, 4)), mask_ratio=1.0, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        masking.guided_mask(jax.random.key(0), jnp.ones((2, 4)), mask_ratio=0.5, beta=1.5)
    with pytest.raises(ValueError, match="patch_scores"):
        masking.guided_mask(jax.random.key(0), jnp.ones((4,)), mask_ratio=0.5, beta=0.5)
    with pytest.raises(ValueError, match="keys"):
        masking.guided_mask(jax.random.split(jax.random.key(0), 3), jnp.ones((2, 4)), mask_ratio=0.5, beta=0.5)


# ------------------------------------------------------------------------------------------------ statistics
# (scores over L = 6 patches, beta): n_g = 1, 2 (fractional β), 3 (β = 1), capped by #{p>0} = 2, and β = 0.
SUBSET_CASES = [
    ([0.0, 1.0, 2.0, 3.0, 5.0, 0.0], 0.5),
    ([0.0, 1.0, 2.0, 3.0, 5.0, 0.0], 0.7),
    ([4.0, 1.0, 0.5, 3.0, 9.0, 2.0], 1.0),
    ([0.0, 0.0, 7.0, 0.0, 1.0, 0.0], 1.0),
    ([0.0, 1.0, 2.0, 3.0, 5.0, 0.0], 0.0),
    ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1.0),
]
N_SUBSET = 40_000


@pytest.mark.parametrize("scores, beta", SUBSET_CASES)
def test_subset_distribution_matches_official_enumeration(sample, scores, beta):
    exact = official_subset_distribution(scores, 3, beta)
    support = [frozenset(c) for c in itertools.combinations(range(6), 3)]  # all 20 subsets
    expected = np.array([exact.get(s, 0.0) for s in support])
    assert expected.sum() == pytest.approx(1.0)
    out = sample(scores, N_SUBSET, beta, seed=hash((tuple(scores), beta)) % 2**31)
    counts = subset_counts(out.mask, support)
    assert np.all(counts[expected == 0] == 0), "a subset the official algorithm never draws was drawn"
    keep = expected > 0
    _, pvalue = stats.chisquare(counts[keep], N_SUBSET * expected[keep])
    assert pvalue > ALPHA


def test_subset_sample_size_rejects_wrong_samplers():
    """The chi-square above has power > 0.99 against near-miss samplers (noncentral chi-square, exact)."""
    support = [frozenset(c) for c in itertools.combinations(range(6), 3)]
    scores, beta = SUBSET_CASES[1]
    right = official_subset_distribution(scores, 3, beta)
    wrongs = {
        "uniform": official_subset_distribution(scores, 3, 0.0),
        "p^0.8 (tempered)": official_subset_distribution(scores, 3, beta, power=0.8),
        "rest also ∝ p": official_subset_distribution(scores, 3, beta, guided_rest=True),
    }
    p = np.array([right.get(s, 0.0) for s in support])
    df = int((p > 0).sum()) - 1
    critical = stats.chi2.isf(ALPHA, df)
    for name, wrong in wrongs.items():
        q = np.array([wrong.get(s, 0.0) for s in support])
        if np.any(q[p == 0] > 0):
            continue  # caught with certainty by the support check
        noncentrality = N_SUBSET * np.sum((q[p > 0] - p[p > 0]) ** 2 / p[p > 0])
        assert stats.ncx2.sf(critical, df, noncentrality) > 0.99, name


def _bonferroni_z(counts, n, prob):
    z = (counts - n * prob) / np.sqrt(n * prob * (1 - prob))
    return np.all(2 * stats.norm.sf(np.abs(z)) > ALPHA / len(counts)), z


def test_per_patch_inclusion_matches_successive_sampling_at_196(sample):
    rng = np.random.default_rng(4)
    weights, sizes = (1.0, 4.0, 20.0, 0.0), (80, 40, 16, 60)
    group = rng.permutation(np.repeat(np.arange(4), sizes))
    scores = np.asarray(weights)[group]
    n, num_mask = 20_000, 98
    n_guided = min(int(num_mask * 0.5), 136)
    pi = successive_sampling_inclusion(weights[:3], sizes[:3], n_guided)
    pi_guided = np.append(pi, 0.0)[group]
    pi_mask = pi_guided + (1 - pi_guided) * (num_mask - n_guided) / (196 - n_guided)
    out = sample(scores, n, 0.5, seed=11)
    ok_guided, _ = _bonferroni_z(out.guided.sum(0), n, np.clip(pi_guided, 1e-12, None))
    ok_mask, _ = _bonferroni_z(out.mask.sum(0), n, pi_mask)
    assert ok_guided and ok_mask
    # Power: drawing ∝ p^0.8 moves some patch by far more than the Bonferroni bound (≈ 4.4 σ).
    tempered = np.append(successive_sampling_inclusion(np.power(weights[:3], 0.8), sizes[:3], n_guided), 0.0)
    assert np.max(np.abs(tempered - np.append(pi, 0.0)) / np.sqrt(pi.max() / n)) > 8


@pytest.mark.parametrize("case", ["beta=0", "zero scores"])
def test_uniform_when_beta_zero_or_scores_zero(sample, case):
    scores = np.random.default_rng(5).random(196) if case == "beta=0" else np.zeros(196)
    beta = 0.0 if case == "beta=0" else 0.5
    n = 20_000
    out = sample(scores, n, beta, seed=12)
    assert not out.guided.any()
    ok, _ = _bonferroni_z(out.mask.sum(0), n, 98 / 196)
    assert ok


# ------------------------------------------------------------------------------------------ scores, schedule
def test_patch_scores_are_row_major_patch_sums():
    g = np.random.default_rng(6).random((2, 12, 8)).astype(np.float32)
    out = np.asarray(masking.patch_scores(jnp.asarray(g), 4))
    ref = np.array([[g[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].sum() for i in range(3) for j in range(2)]
                    for b in range(2)])
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="patch_size"):
        masking.patch_scores(jnp.asarray(g), 5)
    # Stored uint8 maps are summed exactly (in int32), to float32 scores.
    maps = (g > 0.6).astype(np.uint8) * np.uint8(255)
    counts = masking.patch_scores(jnp.asarray(maps), 4)
    assert counts.dtype == jnp.float32
    np.testing.assert_array_equal(counts, masking.patch_scores(jnp.asarray(maps, jnp.float32), 4))


def test_beta_per_epoch_is_official_formula():
    kw = dict(beta_start=0.0, beta_end=0.5, total_steps=100, steps_per_epoch=10, per="epoch")
    got = [float(masking.beta_at(s, **kw)) for s in (0, 9, 10, 55, 99, 150)]
    np.testing.assert_allclose(got, [0.05, 0.05, 0.1, 0.3, 0.5, 0.5], rtol=1e-6)
    # E = ceil(total / steps_per_epoch): a partial last epoch counts.
    last = masking.beta_at(104, beta_start=0.0, beta_end=0.5, total_steps=105, steps_per_epoch=10, per="epoch")
    assert float(last) == pytest.approx(0.5)
    assert float(masking.beta_at(0, **{**kw, "total_steps": 105})) == pytest.approx(0.5 / 11)


def test_beta_per_step_and_traced():
    kw = dict(beta_start=0.1, beta_end=0.5, total_steps=8, steps_per_epoch=3, per="step")
    traced = jax.jit(lambda s: masking.beta_at(s, **kw))
    got = [float(traced(jnp.int32(s))) for s in range(8)]
    np.testing.assert_allclose(got, [0.1 + (s + 1) / 8 * 0.4 for s in range(8)], rtol=1e-6)
    with pytest.raises(ValueError, match="beta_per"):
        masking.beta_at(0, **{**kw, "per": "epochs"})


def test_guidance_map_weight_one_is_the_stored_map():
    b = (np.random.default_rng(7).random((2, 16, 16)) > 0.8).astype(np.uint8)
    out = masking.guidance_map(jnp.asarray(b), None, map_weight=1.0)
    np.testing.assert_array_equal(out, b)
    with pytest.raises(ValueError, match="map_weight"):
        masking.guidance_map(jnp.asarray(b), None, map_weight=1.5)


def test_guidance_map_mixes_normalised_vesselness():
    vesselness = pytest.importorskip("vasomim_jax.vesselness", reason="vesselness module not available")
    rng = np.random.default_rng(8)
    grey = rng.integers(0, 255, (2, 32, 32)).astype(np.float32)
    b = (rng.random((2, 32, 32)) > 0.8).astype(np.uint8)
    v = np.asarray(vesselness.frangi(jnp.asarray(grey), sigmas=(1.0, 2.0), black_ridges=True))
    out = np.asarray(masking.guidance_map(jnp.asarray(b), jnp.asarray(grey), map_weight=0.25, filter="frangi",
                                          sigmas=(1.0, 2.0)))
    ref = 0.25 * b + 0.75 * v / v.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="guidance_filter"):
        masking.guidance_map(jnp.asarray(b), jnp.asarray(grey), map_weight=0.5, filter="vesselness")
