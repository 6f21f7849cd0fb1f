"""Vesselness on device: skimage 0.26 parity of frangi/sato, safe gradients, jit/vmap/grad, bad input."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage import color, data, filters

from vasomim_jax import synthetic
from vasomim_jax.vesselness import check_finite, frangi, frangi_gamma, hessian_operators, sato
from vasomim_jax.vesselness_filters import _axis_filters, _difference_form

REAL = pathlib.Path(os.environ.get("VASOMIM_REAL_DATA", pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
ARCADE = REAL / "arcade_stenosis_test" / "images"
needs_arcade = pytest.mark.skipif(not ARCADE.is_dir(), reason=f"real angiograms not found at {ARCADE} (set VASOMIM_REAL_DATA)")
TOL = 1e-5  # max |ours − skimage| relative to the skimage map's max
OURS = {"frangi": frangi, "sato": sato}
SKIMAGE = {"frangi": filters.frangi, "sato": filters.sato}


def arcade(i: int) -> np.ndarray:
    return np.array(Image.open(sorted(ARCADE.glob("*.png"))[i]).convert("L"))


def retina(shape) -> np.ndarray:
    grey = (color.rgb2gray(data.retina()) * 255).astype(np.uint8)
    return grey[200 : 200 + shape[0], 300 : 300 + shape[1]]


def synthetic_batch(shape, n=2) -> np.ndarray:
    images, _ = synthetic.angiograms(range(n), size=64)
    return images[:, : shape[0], : shape[1]]


def assert_matches_skimage(name, images, **kw):
    ours = np.asarray(OURS[name](images, **kw))
    assert ours.dtype == np.float32 and ours.shape == np.shape(images)
    batch = images if np.ndim(images) == 3 else [images]
    ours = ours if np.ndim(images) == 3 else ours[None]
    for i, (image, got) in enumerate(zip(batch, ours)):
        ref = SKIMAGE[name](image, mode="reflect", **kw)
        scale = max(float(ref.max()), 1e-30)
        err = float(np.abs(got - ref).max()) / scale
        assert err <= TOL, f"{name} image {i} {np.shape(image)} {kw}: relative error {err:.2e}"


CASES = {
    # name: (images, [(sigmas, black_ridges), ...]) — sizes odd/even, non-square, below the longest kernel (103 taps)
    "retina_72x90": (lambda: retina((72, 90)), [(range(1, 10, 2), True), ((1, 2, 3, 4), False)]),
    "synthetic_45x37_batch": (lambda: synthetic_batch((45, 37)), [((1, 2, 3, 4), True), ((1.5, 2.5), False)]),
    "synthetic_32x32_batch": (lambda: synthetic_batch((32, 32), 3), [(range(1, 10, 2), True)]),
}


@pytest.mark.parametrize("name", ["frangi", "sato"])
@pytest.mark.parametrize("case", list(CASES))
def test_filters_match_skimage_on_small_images(name, case):
    make, settings = CASES[case]
    images = make()
    for sigmas, black_ridges in settings:
        assert_matches_skimage(name, images, sigmas=sigmas, black_ridges=black_ridges)


@needs_arcade
@pytest.mark.parametrize("name", ["frangi", "sato"])
def test_filters_match_skimage_on_real_angiograms(name):
    crops = np.stack([arcade(i)[100:161, 200:328] for i in range(2)])  # (2, 61, 128)
    assert_matches_skimage(name, crops, sigmas=(1, 2, 3, 4), black_ridges=True)
    assert_matches_skimage(name, crops, sigmas=range(1, 10, 2), black_ridges=False)
    full = np.stack([arcade(2), arcade(3)])
    assert_matches_skimage(name, full, sigmas=range(1, 10, 2) if name == "frangi" else (1, 2, 3, 4))


def test_frangi_gamma_is_taken_per_image_at_first_sigma():
    a = synthetic_batch((48, 48), 1)[0].astype(np.float64)
    batch = np.stack([a, 0.05 * a])  # different contrast: one shared γ would change the second map
    assert_matches_skimage("frangi", batch, sigmas=(2, 1, 3))
    np.testing.assert_allclose(np.asarray(frangi(batch, sigmas=(2, 1, 3))[1]),
                               np.asarray(frangi(batch[1], sigmas=(2, 1, 3))), rtol=0, atol=1e-6)
    assert_matches_skimage("frangi", batch, sigmas=(1, 2), gamma=3.0, beta=0.8)
    # The automatic γ is `frangi_gamma`; passing it back explicitly, one per image, changes nothing.
    gammas = frangi_gamma(batch, 2)
    np.testing.assert_allclose(np.asarray(frangi(batch, sigmas=(2, 1, 3), gamma=gammas)),
                               np.asarray(frangi(batch, sigmas=(2, 1, 3))), rtol=0, atol=1e-6)


def test_frangi_keeps_skimage_response_where_the_hessian_is_exactly_singular():
    # A row-constant image has Hcc = Hrc = 0 exactly: λ1 = 0 and skimage's R_B = 0 even where λ2 < 0 is clipped.
    image = np.full((40, 48), 100, np.uint8)
    image[18:21] = 200
    assert filters.frangi(image, sigmas=(1, 2, 3), black_ridges=True).max() > 0.5
    for black_ridges in (True, False):
        assert_matches_skimage("frangi", image, sigmas=(1, 2, 3), black_ridges=black_ridges)


def test_any_real_dtype_is_accepted_without_rescaling():
    image = synthetic_batch((40, 40), 1)[0]
    for dtype in (np.float64, np.int16, np.float32):
        assert_matches_skimage("sato", image.astype(dtype), sigmas=(1, 2))
    np.testing.assert_array_equal(np.asarray(sato(image, sigmas=(1, 2))),
                                  np.asarray(sato(image.astype(np.float32), sigmas=(1, 2))))


def test_banded_operators_hold_every_nonzero_of_the_dense_operators():
    sigmas = (1.0, 2.0, 3.0, 4.0)
    for axis in (0, 1):
        for sigma, banded_ops in zip(sigmas, hessian_operators(512, sigmas, axis)):
            g0, g1 = _axis_filters(512, sigma)
            dense = ((_difference_form(g1 @ g1), _difference_form(g0 @ g1), g0 @ g0) if axis == 0 else
                     (g0 @ g0, _difference_form(g1 @ g0), _difference_form(g1 @ g1)))
            for banded, ref in zip(banded_ops, dense):
                ref = ref.astype(np.float32)
                nb, t, wn = banded.blocks.shape
                assert nb > 1 and wn < ref.shape[-1] // 2  # long images use the banded form
                rebuilt = np.zeros((nb * t, ref.shape[-1]), np.float32)
                for j, lo in enumerate(banded.starts):
                    rebuilt[j * t : (j + 1) * t, lo : lo + wn] = banded.blocks[j]
                np.testing.assert_array_equal(rebuilt[:512], ref)
                assert not rebuilt[512:].any()
    for shape in ((3, 512, 40), (2, 40, 512)):  # banded along one axis, dense along the other
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert_matches_skimage("sato", image, sigmas=sigmas)
        assert_matches_skimage("frangi", image, sigmas=sigmas)


def test_difference_form_reproduces_the_operator():
    g0, g1 = _axis_filters(37, 2.0)
    x = np.random.default_rng(4).uniform(0, 255, 37)
    np.testing.assert_allclose(_difference_form(g1 @ g0) @ np.diff(x), (g1 @ g0) @ x, rtol=0, atol=1e-10)


EDGE_IMAGES = {
    "zeros": np.zeros((32, 32)),
    "constant": np.full((32, 32), 7.0),
    "single_bright_pixel": np.pad(np.full((1, 1), 255.0), ((16, 15), (9, 22))),
    "saturated": np.full((32, 32), 255.0),
    "noise": np.random.default_rng(1).uniform(0, 255, (32, 32)),
}


@pytest.mark.parametrize("name", ["frangi", "sato"])
def test_gradients_are_finite_and_forward_unchanged_on_edge_images(name):
    batch = np.stack(list(EDGE_IMAGES.values())).astype(np.float32)
    assert_matches_skimage(name, batch, sigmas=(1, 2))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(OURS[name](x, sigmas=(1, 2)) ** 2 + OURS[name](x, sigmas=(1, 2)))))
    g = np.asarray(grad(jnp.asarray(batch)))
    for i, key in enumerate(EDGE_IMAGES):
        assert np.isfinite(g[i]).all(), f"{name}: non-finite gradient on the {key} image"


@pytest.mark.parametrize("name", ["frangi", "sato"])
def test_gradient_matches_finite_differences(name):
    image = jnp.asarray(ndi.gaussian_filter(np.random.default_rng(2).uniform(0, 255, (24, 28)), 2), jnp.float32)
    direction = jnp.asarray(ndi.gaussian_filter(np.random.default_rng(3).normal(size=(24, 28)), 1), jnp.float32)
    # One σ: the max over scales is not differentiable where scales tie; squaring smooths max(λ, 0).
    loss = lambda x: jnp.sum(OURS[name](x, sigmas=(2.0,)) ** 2)  # noqa: E731
    analytic = float(jnp.vdot(jax.grad(loss)(image), direction))
    eps = 0.1
    numeric = float(loss(image + eps * direction) - loss(image - eps * direction)) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-2 * abs(numeric) + 1e-6, (analytic, numeric)


def test_jit_and_vmap_give_the_eager_result():
    batch = synthetic_batch((40, 36), 3).astype(np.float32)
    eager = np.asarray(frangi(batch, sigmas=(1, 2)))
    jitted = np.asarray(jax.jit(lambda x: frangi(x, sigmas=(1, 2)))(batch))
    mapped = np.asarray(jax.vmap(lambda x: frangi(x, sigmas=(1, 2)))(batch))
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mapped, eager, rtol=0, atol=1e-6)
    traced_gamma = jax.jit(lambda x, g: frangi(x, sigmas=(1, 2), gamma=g))(batch[0], 2.5)
    np.testing.assert_allclose(np.asarray(traced_gamma), np.asarray(frangi(batch[0], sigmas=(1, 2), gamma=2.5)), atol=1e-6)


def test_non_finite_images_are_rejected_naming_the_first_bad_index():
    batch = np.zeros((4, 16, 16), np.float32)
    batch[2, 3, 3] = np.nan
    batch[3, 0, 0] = np.inf
    for fn in (frangi, sato):
        with pytest.raises(ValueError, match=r"images\[2\]"):
            fn(batch)
    with pytest.raises(ValueError, match=r"scans\[1\]"):
        check_finite([np.zeros((4, 4)), np.full((3, 3), np.inf)], name="scans")
    with pytest.raises(ValueError, match="single image"):
        check_finite(batch[2])
    check_finite(np.zeros((2, 3, 3), np.uint8))


@pytest.mark.parametrize("shape", [(16,), (2, 2, 16, 16), (0, 16, 16), (16, 0), (0, 0)])
def test_bad_shapes_are_rejected_before_computation(shape):
    with pytest.raises(ValueError, match=r"images (must be \(H, W\) or \(B, H, W\)|is empty)"):
        frangi(np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match=r"images (must be|is empty)"):
        sato(np.zeros(shape, np.float32))


def test_bad_parameters_are_rejected():
    image = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="sigmas"):
        sato(image, sigmas=())
    with pytest.raises(ValueError, match="sigmas"):
        frangi(image, sigmas=(1, -2))
    with pytest.raises(ValueError, match="beta"):
        frangi(image, beta=0.0)
    with pytest.raises(ValueError, match="gamma"):
        frangi(image, gamma=0.0)
    with pytest.raises(ValueError, match=r"gamma must be a scalar or one value per image \(2,\)"):
        frangi(np.zeros((2, 8, 8)), gamma=np.ones(3))
    with pytest.raises(TypeError, match="real-valued"):
        sato(np.zeros((8, 8), np.complex64))
