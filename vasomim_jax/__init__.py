"""vasomim-jax: VasoMIM (vascular anatomy-aware masked image modeling) for X-ray angiograms in JAX/Flax."""

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name):  # lazy: `import vasomim_jax` stays cheap (no jax import) for the CLI and workers
    if name == "load_pretrained":
        from vasomim_jax.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'vasomim_jax' has no attribute {name!r}")
