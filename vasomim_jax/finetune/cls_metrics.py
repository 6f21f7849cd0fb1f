"""Classification scores on host: accuracy and ROC AUC (binary, or macro one-vs-rest for K > 2 classes)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """probs (N, K), labels int (N,) -> fraction of arg-max hits."""
    return float(np.mean(np.argmax(probs, axis=-1) == labels))


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos n_neg) with average ranks for ties; NaN when one class is absent."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """probs (N, K), labels (N,): AUC of class 1 for K = 2, else the mean one-vs-rest AUC over the classes
    present (classes with no positive or no negative example are left out)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], labels == 1)
    per_class = [binary_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    per_class = [a for a in per_class if np.isfinite(a)]
    return float(np.mean(per_class)) if per_class else float("nan")
