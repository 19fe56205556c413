"""Signal helpers both toy voices share: smoothing of control tracks, the STFT frame grid, overlap-add."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import convolve1d


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Hann-window moving average along axis 0 (onset/offset ramps, coarticulation)."""
    if width <= 1:
        return x
    w = np.hanning(width + 2)[1:-1]
    return convolve1d(x, w / w.sum(), axis=0, mode="nearest")


def stft_geometry(sample_rate: int) -> tuple[int, int]:
    nfft = 1 << round(math.log2(0.032 * sample_rate))
    return nfft, nfft // 4


def overlap_add(frames_td: np.ndarray, hop: int, nfft: int, n: int) -> np.ndarray:
    """Weighted overlap-add of windowed time frames ``(frames, nfft)`` into ``n`` samples (75 % overlap)."""
    frames = frames_td.shape[0]
    r_ = nfft // hop
    blocks = np.zeros((frames + r_ - 1, hop))
    parts = frames_td.reshape(frames, r_, hop)
    for k in range(r_):
        blocks[k:k + frames] += parts[:, k, :]
    return blocks.reshape(-1)[nfft // 2: nfft // 2 + n] / 2.0


def to_int16(y: np.ndarray, rng: np.random.Generator, gain_db: tuple[float, float]) -> np.ndarray:
    """Level the utterance around -20 dBFS (``gain_db`` spread), keep peaks under 0.98, as int16."""
    rms = float(np.sqrt(np.mean(y**2))) or 1.0
    y = y * 10.0 ** ((-20.0 + rng.uniform(*gain_db)) / 20.0) / rms
    peak = float(np.max(np.abs(y)))
    if peak > 0.98:
        y *= 0.98 / peak
    return np.round(y * 32767.0).astype(np.int16)
