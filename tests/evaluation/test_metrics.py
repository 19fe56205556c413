"""EER and minDCF against independent references: a brute-force threshold sweep and sklearn's ROC."""

import time

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from raysv.evaluation.metrics import compute_eer, compute_min_dcf


def brute_force(scores, labels, p_target=0.01):
    """Every threshold, rates by counting: slow and obviously right."""
    tar = scores[labels == 1]
    non = scores[labels == 0]
    thresholds = np.r_[-np.inf, np.unique(scores)]
    p_miss = np.array([(tar <= t).mean() for t in thresholds])
    p_fa = np.array([(non > t).mean() for t in thresholds])
    dcf = (p_target * p_miss + (1 - p_target) * p_fa).min() / min(p_target, 1 - p_target)
    return p_miss, p_fa, dcf


def eer_from_curves(p_miss, p_fa):
    # order by threshold; find the crossing and interpolate linearly between neighbours
    d = p_miss - p_fa
    i = np.nonzero(d >= 0)[0][0]
    if d[i] == 0:
        return p_miss[i]
    t = d[i - 1] / (d[i - 1] - d[i])
    return p_miss[i - 1] + t * (p_miss[i] - p_miss[i - 1])


@pytest.mark.parametrize("kind", ["continuous", "tied", "quantised"])
def test_against_brute_force_and_roc(kind):
    rng = np.random.default_rng({"continuous": 0, "tied": 1, "quantised": 2}[kind])
    labels = (rng.random(3000) < 0.3).astype(int)
    scores = rng.normal(labels * 1.5, 1.0)
    if kind == "tied":
        scores = np.round(scores, 1)
    if kind == "quantised":
        scores = np.floor(scores * 3) / 3
    p_miss, p_fa, dcf = brute_force(scores, labels)
    assert compute_eer(scores, labels) == pytest.approx(eer_from_curves(p_miss, p_fa), abs=1e-12)
    assert compute_min_dcf(scores, labels, 0.01) == pytest.approx(dcf, abs=1e-12)
    _, _, dcf05 = brute_force(scores, labels, 0.05)
    assert compute_min_dcf(scores, labels, 0.05) == pytest.approx(dcf05, abs=1e-12)
    # sklearn: the EER lies between the rates at the two ROC points around the crossing
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    lo, hi = sorted((fpr[i], fnr[i]))
    assert lo - 0.01 <= compute_eer(scores, labels) <= hi + 0.01


def test_known_values():
    labels = np.array([1, 1, 0, 0])
    assert compute_eer(np.array([0.9, 0.8, 0.1, 0.2]), labels) == 0.0
    assert compute_eer(np.array([0.1, 0.2, 0.9, 0.8]), labels) == 1.0
    assert compute_eer(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


def test_single_class_is_an_error():
    with pytest.raises(ValueError, match="non-target"):
        compute_eer(np.ones(5), np.ones(5, dtype=int))
    with pytest.raises(ValueError, match="target"):
        compute_min_dcf(np.ones(5), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        compute_eer(np.array([np.nan, 1.0]), np.array([0, 1]))


def test_million_trials_fast():
    rng = np.random.default_rng(3)
    labels = (rng.random(1_000_000) < 0.5).astype(np.int8)
    scores = rng.normal(labels, 1.0)
    start = time.perf_counter()
    compute_eer(scores, labels)
    compute_min_dcf(scores, labels)
    assert time.perf_counter() - start < 2.0
