"""vasomim-jax: VasoMIM (vascular anatomy-aware masked image modeling) for X-ray angiograms in JAX/Flax."""

__version__ = "0.1.0"
