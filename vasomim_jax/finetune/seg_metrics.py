"""Per-image segmentation scores on host: Dice (DSC) and clDice (Shit et al., CVPR 2021).

Edge cases (the issue's definition): ground truth and prediction both empty -> 1.0 for both metrics (nothing to
find, nothing found); exactly one of them empty -> 0.0. clDice skeletons come from
``skimage.morphology.skeletonize``:
    Tprec = |S(P) ∩ G| / |S(P)|,  Tsens = |S(G) ∩ P| / |S(G)|,  clDice = 2 Tprec Tsens / (Tprec + Tsens).
"""

from __future__ import annotations

import numpy as np
from skimage.morphology import skeletonize


def _binary(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (H, W) mask, got shape {m.shape}")
    return m.astype(bool)


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _binary(pred, "pred"), _binary(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
    return p, g


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|) for binary (H, W) masks (any dtype; non-zero = foreground)."""
    p, g = _pair(pred, gt)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((p & g).sum()) / total


def cldice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Centreline Dice for binary (H, W) masks (any dtype; non-zero = foreground)."""
    p, g = _pair(pred, gt)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return 1.0
    if p_any != g_any:
        return 0.0
    sp, sg = skeletonize(p), skeletonize(g)  # non-empty for non-empty masks
    tprec = float((sp & g).sum()) / float(sp.sum())
    tsens = float((sg & p).sum()) / float(sg.sum())
    if tprec + tsens == 0.0:
        return 0.0
    return 2.0 * tprec * tsens / (tprec + tsens)


def scores(preds, gts) -> dict[str, np.ndarray]:
    """Per-image ``dice`` and ``cldice`` (float64 (N,)) for sequences of (H, W) masks (sizes may differ)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} ground-truth masks")
    return {"dice": np.array([dice(p, g) for p, g in zip(preds, gts)], np.float64),
            "cldice": np.array([cldice(p, g) for p, g in zip(preds, gts)], np.float64)}
