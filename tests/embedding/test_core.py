"""Embedding maths: L2 normalisation, multi-crop means, chunk bounds."""

from __future__ import annotations

import numpy as np
import pytest

from raysv.embedding.core import TrialProtocol, chunk_bounds, crop_starts, l2_normalize, trial_vector
from raysv.evaluation.scoring import cosine_scores


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_l2_normalize_and_cosine_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(a), axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(a, axis=0), axis=0), 1.0, rtol=1e-6)
    assert np.all(l2_normalize(np.zeros((2, 3))) == 0)
    expected = [_cos(x, y) for x, y in zip(a, b)]
    np.testing.assert_allclose(cosine_scores(a, b), expected, atol=1e-6)
    with pytest.raises(ValueError, match="enroll"):
        cosine_scores(a, b[:5])


def test_trial_vector_zero_crops_is_whole_utterance() -> None:
    wave = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    embed = _RecordingEmbedder()
    got = trial_vector(embed, wave, TrialProtocol(crops=0), sample_rate=1000)
    whole = _RecordingEmbedder()(wave[None])[0]
    np.testing.assert_allclose(got, whole / np.linalg.norm(whole), rtol=1e-5)
    assert len(embed.batches) == 1


def test_embedding_fusion_averages_normalised_random_crops() -> None:
    wave = np.random.default_rng(4).standard_normal(5000).astype(np.float32)
    embed = _RecordingEmbedder()
    protocol = TrialProtocol(crops=5, crop_seconds=1.2, positions="random", fusion="embedding")
    got = trial_vector(embed, wave, protocol, sample_rate=1000)
    assert [b.shape for b in embed.batches] == [(1, 5000), (5, 1200)]
    for crop in embed.batches[1]:  # each crop is a contiguous piece of the wave
        starts = [s for s in range(5000 - 1200 + 1) if wave[s] == crop[0]]
        assert any(np.array_equal(wave[s : s + 1200], crop) for s in starts)
    ref = _RecordingEmbedder()
    vecs = np.concatenate([ref(embed.batches[0]), ref(embed.batches[1])])
    mean = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).mean(0)
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean), rtol=1e-5)

    short = wave[:500]
    embed = _RecordingEmbedder()
    trial_vector(embed, short, protocol, sample_rate=1000)
    np.testing.assert_array_equal(embed.batches[1][0], np.tile(short, 3)[:1200])


def test_score_fusion_is_half_the_crop_matrix_mean_plus_half_the_full_cosine() -> None:
    """The reference's trial score: ½ · mean of the 15 × 15 cosines of evenly spaced crops + ½ · full cosine."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal(9000).astype(np.float32), rng.standard_normal(7000).astype(np.float32)
    protocol = TrialProtocol(crops=15, crop_seconds=2.0, positions="even", fusion="score")
    embed = _RecordingEmbedder()
    score = float(trial_vector(embed, a, protocol, sample_rate=1000) @ trial_vector(embed, b, protocol, sample_rate=1000))

    def crops(w: np.ndarray) -> list[np.ndarray]:
        starts = [round(i * (len(w) - 2000) / 14) for i in range(15)]  # first at 0, last at the end
        return [w[s:s + 2000] for s in starts]

    ref = _RecordingEmbedder()
    ea, eb = ref(np.stack(crops(a))), ref(np.stack(crops(b)))
    matrix = [[_cos(x, y) for y in eb] for x in ea]
    full = _cos(ref(a[None])[0], ref(b[None])[0])
    assert score == pytest.approx(0.5 * np.mean(matrix) + 0.5 * full, rel=1e-5)
    assert crop_starts(9000, 2000, 15, "even", rng).tolist() == [round(i * 7000 / 14) for i in range(15)]


def test_chunk_bounds_cover_the_utterance():
    assert chunk_bounds(100, 100, 30) == [(0, 100)]
    assert chunk_bounds(250, 100, 30) == [(0, 100), (100, 200), (200, 250)]
    assert chunk_bounds(220, 100, 30) == [(0, 100), (100, 200), (120, 220)]
    with pytest.raises(ValueError, match="empty"):
        chunk_bounds(0, 100, 30)


class _RecordingEmbedder:
    """Embeds by fixed projections of simple waveform statistics; remembers every batch."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.proj = np.random.default_rng(9).standard_normal((4, 6))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 2
        self.batches.append(batch.copy())
        feats = np.stack([batch.mean(1), batch.std(1), np.abs(batch).mean(1), batch.max(1)], axis=1)
        return feats @ self.proj
