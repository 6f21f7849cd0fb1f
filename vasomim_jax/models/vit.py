"""Pre-norm ViT blocks (timm-exact structure) and a scanned block stack.

Parameters are float32; ``dtype`` is the compute dtype (bfloat16 for mixed precision). Attention softmax and
LayerNorm statistics run in float32 whatever ``dtype`` is. The residual stream keeps the dtype it enters with.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-6
# Official MAE initialises every Linear with xavier_uniform_ and zero bias.
dense_init = nn.initializers.xavier_uniform()

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep every matmul output
    # Keep only the weight matmuls (not the (B, heads, N, N) attention products): the L/H memory saver.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    # Two-pass variance as torch's LayerNorm.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_init,
                    bias_init=nn.initializers.zeros, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; qkv output features ordered (3, heads, head_dim)."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, N, D) -> (B, N, D) in ``dtype``."""
        b, n, _ = x.shape
        hd = self.dim // self.num_heads
        qkv = dense(3 * self.dim, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd)
        q = q * jnp.asarray(hd**-0.5, q.dtype)  # timm scales q before the product
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, self.dim)
        return dense(self.dim, self.dtype, "proj")(out)


class Mlp(nn.Module):
    hidden: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = dense(self.hidden, self.dtype, "fc1")(x)
        x = nn.gelu(x, approximate=False)  # exact erf GELU as timm / PyTorch MAE
        return dense(self.dim, self.dtype, "fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block; ``(x, _) -> (x, None)`` so that it can be the body of `nn.scan`."""

    dim: int
    num_heads: int
    mlp_hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, _: Any = None) -> tuple[jnp.ndarray, None]:
        y = Attention(self.dim, self.num_heads, self.dtype, name="attn")(layer_norm(self.dtype, "norm1")(x))
        x = x + y.astype(x.dtype)
        y = Mlp(self.mlp_hidden, self.dim, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x))
        return x + y.astype(x.dtype), None


class Transformer(nn.Module):
    """``depth`` blocks under one `nn.scan` (params with a leading depth axis) and a final LayerNorm."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1  # lax.scan unroll factor; `depth` unrolls fully (benchmarks only)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """(B, N, D) float32 -> (B, N, D) in ``dtype`` after the final norm."""
        block = Block
        if self.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                        length=self.depth, unroll=self.scan_unroll)
        x, _ = stack(self.dim, self.num_heads, int(self.dim * self.mlp_ratio), self.dtype, name="blocks")(x, None)
        return layer_norm(self.dtype, "norm")(x)
