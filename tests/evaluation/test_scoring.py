"""Scoring: cosine, AS-norm against a per-trial loop, multi-crop, EER threshold, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from raysv.evaluation import scoring
from raysv.evaluation.metrics import compute_eer
from raysv.evaluation.plots import plot_det, plot_rounds, plot_score_histogram
from raysv.evaluation.scoring import (
    decide,
    error_rates,
    evaluate_scores,
    score_trials,
    threshold_at_eer,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _random_trials(rng: np.random.Generator, n_utts: int = 40, dim: int = 12, n_trials: int = 150):
    emb = {f"spk{i % 7}/utt{i}": rng.standard_normal(dim).astype(np.float32) for i in range(n_utts)}
    ids = list(emb)
    enroll = [ids[i] for i in rng.integers(n_utts, size=n_trials)]
    test = [ids[i] for i in rng.integers(n_utts, size=n_trials)]
    return emb, enroll, test


def test_score_trials_without_cohort_is_cosine() -> None:
    rng = np.random.default_rng(1)
    emb, enroll, test = _random_trials(rng)
    expected = [_cos(emb[e], emb[t]) for e, t in zip(enroll, test)]
    np.testing.assert_allclose(score_trials(emb, enroll, test), expected, atol=1e-6)


def _asnorm_reference(emb, enroll, test, cohort, top_n):
    """One trial at a time, straight from the definition."""
    out = []
    for e, t in zip(enroll, test):
        s = _cos(emb[e], emb[t])
        stats = []
        for u in (e, t):
            c = np.array([_cos(emb[u], row) for row in cohort])
            best = np.sort(c)[::-1][: top_n or len(c)]
            stats.append((best.mean(), best.std()))
        (me, se), (mt, st) = stats
        out.append(0.5 * ((s - me) / se + (s - mt) / st))
    return np.array(out)


@pytest.mark.parametrize("top_n", [None, 1 + 1, 25, 500])
def test_asnorm_equals_per_trial_loop(top_n: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    emb, enroll, test = _random_trials(rng)
    cohort = rng.standard_normal((120, 12))
    monkeypatch.setattr(scoring, "COHORT_CHUNK_ELEMENTS", 7 * 120 + 5)  # 7-row chunks, ragged end
    got = score_trials(emb, enroll, test, cohort=cohort, top_n=top_n)
    ref = _asnorm_reference(emb, enroll, test, cohort, min(top_n, 120) if top_n else None)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_asnorm_removes_per_utterance_offsets() -> None:
    """Utterances share a 'hub' direction with random strength: raw cosine gets per-utterance offsets."""
    rng = np.random.default_rng(0)
    dim = 32
    hub = np.ones(dim) / np.sqrt(dim)

    def corpus(n_spk: int, per: int, tag: str):
        emb, spk = {}, {}
        for s in range(n_spk):
            centre = rng.standard_normal(dim)
            for u in range(per):
                key = f"{tag}{s}_{u}"
                emb[key] = centre + 0.8 * rng.standard_normal(dim) + rng.uniform(0, 3) * np.sqrt(dim) * hub
                spk[key] = s
        return emb, spk

    emb, spk = corpus(60, 4, "t")
    cohort = np.stack(list(corpus(100, 3, "c")[0].values()))
    ids = list(emb)
    enroll, test = [], []
    for _ in range(3000):
        a, b = rng.choice(len(ids), 2, replace=False)
        enroll.append(ids[a])
        test.append(ids[b])
    for i in range(0, len(ids), 4):
        for j in range(1, 4):
            enroll.append(ids[i])
            test.append(ids[i + j])
    labels = np.array([int(spk[e] == spk[t]) for e, t in zip(enroll, test)])
    raw = compute_eer(score_trials(emb, enroll, test), labels)
    normed = compute_eer(score_trials(emb, enroll, test, cohort=cohort, top_n=50), labels)
    assert normed < 0.75 * raw, (raw, normed)


def test_score_trials_errors_name_the_input() -> None:
    emb = {"a": np.ones(3), "b": np.ones(3)}
    with pytest.raises(KeyError, match="missing_utt"):
        score_trials(emb, ["a"], ["missing_utt"])
    with pytest.raises(ValueError, match="differ in length"):
        score_trials(emb, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="dimension"):
        score_trials(emb, ["a"], ["b"], cohort=np.ones((4, 5)))


def _trial_scores(seed: int = 5, n: int = 2000):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    scores = np.where(labels, rng.normal(1.5, 1.0, n), rng.normal(0.0, 1.0, n))
    return np.round(scores, 2), labels.astype(int)  # rounding makes ties


def test_threshold_at_eer_is_the_crossing_point() -> None:
    scores, labels = _trial_scores()
    thr = threshold_at_eer(scores, labels)
    accept = decide(scores, thr)
    assert accept.dtype == bool
    miss = np.mean(~accept[labels == 1])
    fa = np.mean(accept[labels == 0])
    # Brute force over every cut between distinct scores: none has a smaller |miss - fa|.
    values = np.unique(scores)
    cuts = np.r_[values[0] - 1, (values[1:] + values[:-1]) / 2, values[-1] + 1]
    gaps = [abs(np.mean(scores[labels == 1] < c) - np.mean(scores[labels == 0] >= c)) for c in cuts]
    assert abs(miss - fa) == pytest.approx(min(gaps))
    eer = compute_eer(scores, labels)
    assert abs(miss - eer) < 0.02 and abs(fa - eer) < 0.02


def test_error_rates_match_sklearn_roc() -> None:
    scores, labels = _trial_scores(6, 500)
    thresholds, p_miss, p_fa = error_rates(scores, labels)
    fpr, tpr, roc_thr = roc_curve(labels, scores)
    for f, t, th in zip(fpr[1:], tpr[1:], roc_thr[1:]):  # sklearn accepts scores >= th
        i = int(np.searchsorted(thresholds, th, side="right")) - 1
        assert np.mean(scores[labels == 1] >= thresholds[i]) == pytest.approx(t)
        assert p_fa[i] == pytest.approx(f) and 1 - p_miss[i] == pytest.approx(t)


def test_evaluate_scores_summary() -> None:
    scores, labels = _trial_scores()
    out = evaluate_scores(scores, labels)
    assert set(out) == {"eer", "min_dcf_0.01", "min_dcf_0.05", "threshold", "trials"}
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    assert out["eer"] == pytest.approx((fnr[i] + fpr[i]) / 2, abs=0.01)
    assert 0 < out["min_dcf_0.05"] <= out["min_dcf_0.01"] <= 1.0
    assert out["threshold"] == pytest.approx(threshold_at_eer(scores, labels))
    assert out["trials"] == len(scores)
    with pytest.raises(ValueError, match="both target and non-target"):
        evaluate_scores(scores, np.ones_like(labels))


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path: Path) -> None:
    scores, labels = _trial_scores(7, 600)
    det = plot_det(scores, labels, tmp_path / "figs" / "det.png", title="toy")
    hist = plot_score_histogram(scores, labels, tmp_path / "hist.png", threshold=0.7)
    stages = [
        {"name": "dino", "eer": 0.12},
        {"name": "round 1", "eer": 0.08, "nmi": 0.79},
        {"name": "round 2", "eer": 0.06, "nmi": 0.85},
    ]
    rounds = plot_rounds(stages, tmp_path / "rounds.png")
    rounds_eer_only = plot_rounds([{"name": "dino", "eer": 0.1}], str(tmp_path / "r1.png"))
    for p in (det, hist, rounds, rounds_eer_only):
        assert Path(p).exists() and _is_png(Path(p))
    with pytest.raises(ValueError, match="stage 0"):
        plot_rounds([{"eer": 0.1}], tmp_path / "bad.png")
