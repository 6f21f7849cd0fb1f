"""Hessian vesselness on device and the offline vessel-map recipe (one import point for both).

`frangi` / `sato`: skimage 0.26-exact, differentiable filters in jax.numpy (`vesselness_filters`).
`vessel_map` / `vessel_maps`: the XA-SSL vessel-map recipe, filter on device by default (`vesselness_maps`).
"""

from vasomim_jax.vesselness_filters import (
    DEFAULT_SIGMAS,
    check_finite,
    frangi,
    frangi_gamma,
    hessian_operators,
    sato,
)
from vasomim_jax.vesselness_maps import vessel_map, vessel_maps

__all__ = (
    "DEFAULT_SIGMAS",
    "check_finite",
    "frangi",
    "frangi_gamma",
    "hessian_operators",
    "sato",
    "vessel_map",
    "vessel_maps",
)
