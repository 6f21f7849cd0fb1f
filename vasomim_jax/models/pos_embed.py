"""Fixed 2-D sin-cos position embeddings in the facebookresearch/mae convention.

MAE (`util/pos_embed.py`) builds the grid with ``np.meshgrid(grid_w, grid_h)``, so ``grid[0]`` holds the column (w)
coordinate; the first half of each embedding (MAE's ``emb_h``) encodes that column coordinate and the second half the
row coordinate. Each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 1 / 10000**(i / (D/4))``.
The cls row is all zeros. Matching this exactly keeps exported weights interchangeable with official checkpoints.
"""

from __future__ import annotations

import numpy as np


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) float64: [sin(pos*omega), cos(pos*omega)]."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000.0**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> np.ndarray:
    """MAE 2-D sin-cos table for a (gh, gw) patch grid in row-major patch order.

    Args:
      embed_dim: D, a multiple of 4 (two axes, each split into sin and cos halves).
      grid_size: ``g`` for a square g x g grid, or ``(gh, gw)`` for a non-square one.
      cls_token: prepend the all-zero cls row.
    Returns:
      float32 numpy array (1 + gh*gw, D) with the cls row, (gh*gw, D) without.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sincos_2d: embed_dim={embed_dim} must be a multiple of 4")
    gh, gw = (grid_size, grid_size) if np.ndim(grid_size) == 0 else tuple(grid_size)
    if gh < 1 or gw < 1:
        raise ValueError(f"sincos_2d: grid_size={grid_size} must be positive")
    # Float32 grid coordinates as in MAE; the products are formed in float64 there as well.
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(embed_dim // 2, grid_w), _sincos_1d(embed_dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)
