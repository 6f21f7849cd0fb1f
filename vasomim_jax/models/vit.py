"""Pre-norm ViT blocks (timm-exact structure), a scanned block stack with stochastic depth, and the MAE's ViT
encoder on all patches (patch embedding + cls token + fixed sin-cos positions + block stack).

Parameters are float32; ``dtype`` is the compute dtype (bfloat16 for mixed precision). Attention softmax and
LayerNorm statistics run in float32 whatever ``dtype`` is. The residual stream keeps the dtype it enters with.
Stochastic depth (drop-path) is off by default and active only with ``deterministic=False`` / ``train=True``
and a 'dropout' rng.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vasomim_jax.models.patches import patchify
from vasomim_jax.models.pos_embed import sincos_2d

LN_EPS = 1e-6
# Official MAE initialises every Linear with xavier_uniform_ and zero bias.
dense_init = nn.initializers.xavier_uniform()
# Official MAE: xavier_uniform_ on the conv weight viewed as (D, p*p*C), i.e. fan_in = p*p*C, fan_out = D.
patch_embed_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)

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


def drop_path(x: jnp.ndarray, rate: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
    """Zeroes whole examples of a residual branch with probability ``rate`` and rescales the rest by 1/(1-rate)
    (timm ``drop_path``). x (B, ...); rate a float scalar (may be traced: it is scanned over depth)."""
    keep = 1.0 - rate
    mask = jax.random.uniform(rng, (x.shape[0],) + (1,) * (x.ndim - 1)) < keep
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12).astype(x.dtype), jnp.zeros_like(x))


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
        # (B, H, N, hd): batch dims leading, the layout XLA's batched GEMMs take without extra copies (measured
        # on CPU: attention forward+backward 18 % faster than contracting in the (B, N, H, hd) layout).
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        q = q * jnp.asarray(hd**-0.5, q.dtype)  # timm scales q before the product
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, n, self.dim)
        return dense(self.dim, self.dtype, "proj")(out)


class Mlp(nn.Module):
    hidden: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = dense(self.hidden, self.dtype, "fc1")(x)
        return dense(self.dim, self.dtype, "fc2")(gelu(x))


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact (erf) GELU as timm / PyTorch MAE, written with `lax.erf`: on XLA CPU the MLP's forward+backward runs
    16 % faster than with ``nn.gelu(approximate=False)`` (its erfc-based form); same values within 3e-7."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


class Block(nn.Module):
    """Pre-norm transformer block with drop-path on both residual branches unless ``deterministic``.

    ``(x (B, N, D), rate float32 scalar) -> (x, None)`` so that it is the body of an `nn.scan` over the rates."""

    dim: int
    num_heads: int
    mlp_hidden: int
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, rate: jnp.ndarray) -> tuple[jnp.ndarray, None]:
        def residual(y):
            y = y.astype(x.dtype)
            return y if self.deterministic else drop_path(y, rate, self.make_rng("dropout"))

        x = x + residual(Attention(self.dim, self.num_heads, self.dtype, name="attn")(
            layer_norm(self.dtype, "norm1")(x)))
        x = x + residual(Mlp(self.mlp_hidden, self.dim, self.dtype, name="mlp")(
            layer_norm(self.dtype, "norm2")(x)))
        return x, None


class Transformer(nn.Module):
    """``depth`` blocks under one `nn.scan` (params with a leading depth axis) and a final LayerNorm.

    Drop-path rate rises linearly 0 -> ``drop_path_rate`` over the blocks (timm); 0 switches it off."""

    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1  # lax.scan unroll factor; `depth` unrolls fully (benchmarks only)
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """(B, N, D) float32 -> (B, N, D) in ``dtype`` after the final norm. ``deterministic=False`` with a
        non-zero rate needs a 'dropout' rng."""
        block = Block
        if self.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=0, length=self.depth, unroll=self.scan_unroll)
        rates = jnp.asarray(np.linspace(0.0, self.drop_path_rate, self.depth), jnp.float32)
        deterministic = deterministic or self.drop_path_rate == 0.0
        x, _ = stack(self.dim, self.num_heads, int(self.dim * self.mlp_ratio), self.dtype, deterministic,
                     name="blocks")(x, rates)
        return layer_norm(self.dtype, "norm")(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D features: nn.Conv's parameters (kernel (p, p, C, D), bias (D,); the
    official ``patch_embed.proj``) applied as one matmul to flattened patches, so that MAE can embed only the
    visible ones.

    Raw uint8 patches take the input normalisation folded into the kernel: ((g/255 - m_c)/s_c) . W_c summed
    over channels is g . sum_c W_c/(255 s_c) minus a constant, so a grey patch (S = 1, replicated to C channels
    by `preprocess`) is embedded with p*p rather than p*p*C inputs and is gathered as 1 byte per pixel instead
    of 4*C."""

    patch_size: int
    in_chans: int
    embed_dim: int
    dtype: Any = jnp.float32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, patches: jnp.ndarray) -> jnp.ndarray:
        """patches (B, n, p*p*S) in `patchify` order: float normalised with S = in_chans, or uint8 with S 1
        (grey) or in_chans -> float32 (B, n, D)."""
        p, c, d = self.patch_size, self.in_chans, self.embed_dim
        kernel = self.param("kernel", patch_embed_init, (p, p, c, d), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        if patches.dtype == jnp.uint8:
            if self.mean is None or self.std is None or len(self.mean) != c or len(self.std) != c:
                raise ValueError(f"PatchEmbed: uint8 input needs the model's mean/std with in_chans={c} entries "
                                 f"each (config.model.mean/std), got {self.mean} / {self.std}")
            mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
            bias = bias - jnp.einsum("pqcd,c->d", kernel, mean / std, precision=jax.lax.Precision.HIGHEST)
            kernel = kernel / (255.0 * std[:, None])
            if patches.shape[-1] == p * p:
                kernel = kernel.sum(axis=2, keepdims=True)
        kernel = kernel.reshape(-1, d)
        if patches.shape[-1] != kernel.shape[0]:
            raise ValueError(f"PatchEmbed: patches of {patches.shape[-1]} values do not fit p*p*C = "
                             f"{p}*{p}*{c} ({patches.dtype})")
        out = jnp.dot(patches.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return out + bias


class ViTEncoder(nn.Module):
    """MAE's ViT encoder (timm ``forward_features``): patch embedding, cls token, fixed MAE sin-cos positions and
    the `Transformer` named ``encoder``. Params: patch_embed/{kernel (p,p,C,D), bias}, cls_token (1,1,D),
    encoder/{blocks, norm}; `MAE` extends this module with its decoder, so the names are shared.

    ``drop_path_rate`` applies to the encoder blocks (see `Transformer`)."""

    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    scan_unroll: int = 1
    drop_path_rate: float = 0.0
    mean: tuple[float, ...] | None = None  # the input normalisation, needed only for uint8 input
    std: tuple[float, ...] | None = None

    def setup(self):
        self.patch_embed = PatchEmbed(self.patch_size, self.in_chans, self.embed_dim, self.dtype, self.mean,
                                      self.std)
        self.cls_token = self.param("cls_token", token_init, (1, 1, self.embed_dim), jnp.float32)
        self.encoder = Transformer(self.embed_dim, self.depth, self.num_heads, mlp_ratio=self.mlp_ratio,
                                   dtype=self.dtype, remat_policy=self.remat_policy, scan_unroll=self.scan_unroll,
                                   drop_path_rate=self.drop_path_rate)

    def _patches(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Model input -> its flattened patches (B, L, p*p*S) in the input's dtype and the encoder pos table
        (1+L, D). x: float (B, H, W, in_chans) normalised, or raw uint8 (B, H, W[, S]) with S 1 (grey) or
        in_chans."""
        name = type(self).__name__
        if x.dtype == jnp.uint8 and x.ndim == 3:
            x = x[..., None]
        channels = (1, self.in_chans) if x.dtype == jnp.uint8 else (self.in_chans,)
        if x.ndim != 4 or x.shape[-1] not in channels:
            raise ValueError(f"{name}: x must be float (B, H, W, in_chans={self.in_chans}) or uint8 (B, H, W[, 1|"
                             f"{self.in_chans}]), got {x.dtype} of shape {x.shape}")
        h, w, p = x.shape[1], x.shape[2], self.patch_size
        if h % p or w % p:
            raise ValueError(f"{name}: image size {h}x{w} is not divisible by patch_size={p}")
        return patchify(x, p), jnp.asarray(sincos_2d(self.embed_dim, (h // p, w // p), cls_token=True))

    def _with_cls(self, tokens: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
        cls = jnp.broadcast_to(self.cls_token + pos[:1], (tokens.shape[0], 1, self.embed_dim))
        return jnp.concatenate([cls, tokens], axis=1)

    def encode(self, x: jnp.ndarray, *, train: bool = False,
               pos_embed: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Encoder on all patches, no masking (timm ``forward_features``).

        x: float (B, H, W, C) normalised, or raw uint8 (B, H, W[, 1|C]) normalised inside (`PatchEmbed`).
        Returns tokens float32 (B, 1+L, D) after the final norm and the pooled feature float32 (B, D) =
        tokens[:, 0] (cls token). ``train`` enables drop-path ('dropout' rng). ``pos_embed`` (1, 1+L, D)
        replaces the fixed sin-cos table (timm checkpoints with learned position embeddings).
        """
        patches, pos = self._patches(x)
        if pos_embed is not None:
            if pos_embed.shape[1:] != pos.shape:
                raise ValueError(f"images give {pos.shape[0] - 1} patches; the learned position embeddings hold "
                                 f"{pos_embed.shape[1] - 1} (load with model_cfg= for another size)")
            pos = pos_embed[0]
        tokens = self.patch_embed(patches) + pos[1:]
        tokens = self.encoder(self._with_cls(tokens, pos), deterministic=not train).astype(jnp.float32)
        return tokens, tokens[:, 0]

    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """x (see `encode`) -> tokens float32 (B, 1+L, D); the tokens of `encode`."""
        return self.encode(x, train=train)[0]
