"""The untrained ``fbank-mean`` baseline: utterance mean and std of the raw log-mel fbank.

It is the floor every learned encoder must beat: it sees the long-term spectrum
(voice plus channel) and its spread, nothing a model had to learn.
"""

from __future__ import annotations

import numpy as np
import soundfile as sf
import torch

from raysv.audio.features import Fbank
from raysv.audio.io import SAMPLE_RATE

_FBANKS: dict[int, Fbank] = {}


def _fbank(sample_rate: int) -> Fbank:
    if sample_rate not in _FBANKS:
        _FBANKS[sample_rate] = Fbank(n_mels=80, sample_rate=sample_rate, norm="none").eval()
    return _FBANKS[sample_rate]


def fbank_mean_embedding(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """160-d vector: per-band mean then per-band std over time of the un-normalised 80-d log-mel fbank."""
    x = np.asarray(wave)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"fbank_mean_embedding: expected a non-empty 1-d waveform, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    with torch.no_grad():
        feats = _fbank(sample_rate)(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None])[0]
    mean = feats.mean(dim=1)
    std = feats.std(dim=1, unbiased=False)
    return torch.cat([mean, std]).numpy().astype(np.float32)


def fbank_mean_embed_files(paths: list[str], sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Embed audio files as an ``(N, 160)`` float32 array, in the order given."""
    out = np.zeros((len(paths), 160), dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            wave, sr = sf.read(str(p), dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - name the file whatever libsndfile raised
            raise ValueError(f"fbank_mean_embed_files: cannot read {p}: {exc}") from exc
        if sr != sample_rate:
            raise ValueError(f"fbank_mean_embed_files: {p} has sample rate {sr}, expected {sample_rate}")
        out[i] = fbank_mean_embedding(wave.mean(axis=1), sample_rate)
    return out
