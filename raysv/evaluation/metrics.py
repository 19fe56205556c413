"""Verification metrics, NIST style: sort once, cumulative sums, interpolated EER."""

from __future__ import annotations

import numpy as np


def _error_curves(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct threshold, thresholds ascending.

    Point i means "accept scores strictly above the i-th distinct score"; the first
    point accepts everything (P_miss 0, P_fa 1), the last accepts nothing.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length")
    if scores.size == 0:
        raise ValueError("no trials to score")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    targets = labels.astype(bool)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    n_tar = int(targets.sum())
    n_non = targets.size - n_tar
    if n_tar == 0 or n_non == 0:
        kind = "target" if n_tar == 0 else "non-target"
        raise ValueError(f"labels hold no {kind} trials: EER and minDCF need both classes")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_tar = targets[order]
    # Group tied scores: a threshold cannot separate them.
    last_of_group = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tar_below = np.cumsum(sorted_tar)[last_of_group]
    non_below = np.cumsum(~sorted_tar)[last_of_group]
    p_miss = np.r_[0.0, tar_below / n_tar]
    p_fa = np.r_[1.0, 1.0 - non_below / n_non]
    return p_miss, p_fa


def compute_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate as a fraction, interpolated where miss and false-alarm curves cross."""
    p_miss, p_fa = _error_curves(scores, labels)
    diff = p_miss - p_fa  # rises from -1 to +1
    i = int(np.searchsorted(diff, 0.0, side="left"))
    if diff[i] == 0.0:
        return float(p_miss[i])
    # Crossing between points i-1 (diff < 0) and i (diff > 0): intersect the two segments.
    d0, d1 = diff[i - 1], diff[i]
    t = d0 / (d0 - d1)
    return float(p_miss[i - 1] + t * (p_miss[i] - p_miss[i - 1]))


def compute_min_dcf(
    scores: np.ndarray, labels: np.ndarray, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    """Minimum detection cost over thresholds, normalised by min(c_miss·p, c_fa·(1−p))."""
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    p_miss, p_fa = _error_curves(scores, labels)
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))
