"""Trial scoring: cosine, AS-norm, the EER threshold and a summary.

Everything is NumPy so it runs on the driver or in any Ray worker without a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raysv.embedding.core import l2_normalize
from raysv.evaluation.metrics import compute_eer, compute_min_dcf

# Elements of one chunk of the (utterances × cohort) score matrix: 16 Mi float64 = 128 MiB.
COHORT_CHUNK_ELEMENTS = 1 << 24
_EPS = 1e-12


def cosine_scores(enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired (N, D) embeddings → (N,)."""
    enroll = np.atleast_2d(np.asarray(enroll, dtype=np.float32))
    test = np.atleast_2d(np.asarray(test, dtype=np.float32))
    if enroll.shape != test.shape or enroll.ndim != 2:
        raise ValueError(f"enroll {enroll.shape} and test {test.shape} must be equal (N, D) arrays")
    return np.einsum("nd,nd->n", l2_normalize(enroll), l2_normalize(test))


def cohort_statistics(
    embeddings: np.ndarray, cohort: np.ndarray, top_n: int | None = None, cosine: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of each embedding's ``top_n`` highest scores against the cohort.

    Scores are cosines, or dot products of the vectors as they are (``cosine=False``: fused
    trial vectors, and a cohort in the same form). Computed in float64 (a small top-N has
    a small std, which float32 rounding would distort) and in row chunks so the
    (utterances × cohort) matrix never exists whole; ``top_n=None`` (or larger than the
    cohort) uses the whole cohort.
    """
    emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    coh = np.atleast_2d(np.asarray(cohort, dtype=np.float64))
    if cosine:
        emb, coh = l2_normalize(emb), l2_normalize(coh)
    if coh.shape[0] == 0:
        raise ValueError("AS-norm cohort is empty")
    if emb.shape[1] != coh.shape[1]:
        raise ValueError(
            f"cohort dimension {coh.shape[1]} differs from embedding dimension {emb.shape[1]}"
        )
    size = coh.shape[0]
    if top_n is not None and top_n < 1:
        raise ValueError(f"AS-norm top_n must be >= 1, got {top_n}")
    n = size if top_n is None else min(int(top_n), size)
    mean = np.empty(emb.shape[0], dtype=np.float64)
    std = np.empty(emb.shape[0], dtype=np.float64)
    rows = max(1, COHORT_CHUNK_ELEMENTS // size)
    for start in range(0, emb.shape[0], rows):
        s = emb[start : start + rows] @ coh.T
        if n < size:
            s = np.partition(s, size - n, axis=1)[:, size - n :]
        mean[start : start + rows] = s.mean(axis=1)
        std[start : start + rows] = s.std(axis=1)
    return mean, std


def score_trials(
    embeddings: dict[str, np.ndarray],
    enroll: list[str],
    test: list[str],
    cohort: np.ndarray | None = None,
    top_n: int | None = None,
    cosine: bool = True,
) -> np.ndarray:
    """Scores of the trial pairs: cosines (or, ``cosine=False``, dot products of fused trial
    vectors), AS-normalised when a cohort is given.

    AS-norm: s' = ½((s − μ_e)/σ_e + (s − μ_t)/σ_t), with μ, σ the mean and
    (population) std of the ``top_n`` best cohort scores of each side; every
    distinct utterance's statistics are computed once.
    """
    if len(enroll) != len(test):
        raise ValueError(f"enroll ({len(enroll)}) and test ({len(test)}) lists differ in length")
    ids = list(dict.fromkeys([*enroll, *test]))
    missing = [u for u in ids if u not in embeddings]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise KeyError(f"no embedding for trial utterance(s) {', '.join(missing[:5])}{more}")
    if not ids:
        return np.zeros(0, dtype=np.float64)
    index = {u: i for i, u in enumerate(ids)}
    try:
        mat = np.stack([np.asarray(embeddings[u], dtype=np.float64).ravel() for u in ids])
    except ValueError as exc:
        raise ValueError(f"trial embeddings have different dimensions: {exc}") from exc
    if cosine:
        mat = l2_normalize(mat)
    e_idx = np.fromiter((index[u] for u in enroll), dtype=np.int64, count=len(enroll))
    t_idx = np.fromiter((index[u] for u in test), dtype=np.int64, count=len(test))
    scores = np.einsum("nd,nd->n", mat[e_idx], mat[t_idx])
    if cohort is None:
        return scores
    mean, std = cohort_statistics(mat, cohort, top_n, cosine=cosine)
    std = np.maximum(std, _EPS)
    return 0.5 * ((scores - mean[e_idx]) / std[e_idx] + (scores - mean[t_idx]) / std[t_idx])


def check_trials(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 scores and boolean target mask, with a clear error for unusable trials."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (non-target) or 1 (target)")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite")
    targets = labels.astype(bool)
    if targets.all() or not targets.any():
        raise ValueError("trials need both target and non-target labels")
    return scores, targets


def error_rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (ascending) with the miss and false-alarm rates of accepting ``scores >= threshold``.

    One threshold sits between each pair of distinct scores, plus one accepting
    everything and one accepting nothing.
    """
    scores, targets = check_trials(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    s, tar = scores[order], targets[order]
    last = np.r_[s[1:] != s[:-1], True]
    values = s[last]
    tar_below = np.r_[0, np.cumsum(tar)[last]]
    non_below = np.r_[0, np.cumsum(~tar)[last]]
    thresholds = np.r_[values[0], 0.5 * (values[1:] + values[:-1]), np.nextafter(values[-1], np.inf)]
    n_tar, n_non = int(tar.sum()), int((~tar).sum())
    return thresholds, tar_below / n_tar, 1.0 - non_below / n_non


def threshold_at_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Score threshold where the miss and false-alarm rates cross (the EER operating point)."""
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    diff = p_miss - p_fa  # rises from -1 to +1
    i = int(np.searchsorted(diff, 0.0, side="left"))
    if diff[i] == 0.0 or i == 0:
        return float(thresholds[i])
    # Take the side of the crossing with the smaller gap between the two rates.
    return float(thresholds[i] if abs(diff[i]) <= abs(diff[i - 1]) else thresholds[i - 1])


def decide(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Accept (True) trials whose score reaches the threshold."""
    return np.asarray(scores) >= threshold


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """EER, minDCF at p_target 0.01 and 0.05 (fractions), the EER threshold and the trial count."""
    scores, targets = check_trials(scores, labels)
    labels01 = targets.astype(np.int64)
    return {
        "eer": compute_eer(scores, labels01),
        "min_dcf_0.01": compute_min_dcf(scores, labels01, p_target=0.01),
        "min_dcf_0.05": compute_min_dcf(scores, labels01, p_target=0.05),
        "threshold": threshold_at_eer(scores, labels01),
        "trials": int(scores.size),
    }

