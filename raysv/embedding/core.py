"""Utterance embeddings from an encoder: chunking, equal-length batches, crops, L2 normalisation.

Batches only ever hold waveforms of exactly the same length, so nothing is padded and an
utterance's embedding never depends on which other utterances shared its batch (padding
changes WavLM's group-normalised feature encoder and any attention pooling).
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raysv.audio.io import SAMPLE_RATE

MIN_CHUNK_SECONDS = 1.0
"""A trailing chunk shorter than this is replaced by the last full window: too short to describe a speaker."""
MAX_GROUP_BATCH = 64
"""Largest number of equal-length waveforms sent through the encoder at once (bounds memory for long files)."""
_EPS = 1e-12


@dataclass
class TrialProtocol:
    """How a file of a trial is embedded and two files scored (``eval`` in the config, ``model.json``).

    The reference (wavlm_ssl_sv): 15 evenly spaced 4 s crops besides the whole file, and a
    trial's score ½ · mean of the 15 × 15 crop cosines + ½ · cosine of the whole files
    (``fusion: score``). ``fusion: embedding`` averages the whole file's and the crops'
    unit embeddings into one, scored by cosine.
    """

    crops: int = 15
    crop_seconds: float = 4.0
    max_seconds: float = 30.0
    positions: str = "even"  # even | random
    fusion: str = "score"  # score | embedding
    seed: int = 0

    @property
    def cosine(self) -> bool:
        """Whether trial vectors are scored by cosine (else by dot product: fused score vectors)."""
        return self.fusion == "embedding" or self.crops == 0


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit-length vectors along ``axis`` (zero vectors stay zero), so dot products are cosines."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, _EPS)


def chunk_bounds(num_samples: int, max_samples: int, min_samples: int) -> list[tuple[int, int]]:
    """``(start, end)`` of the chunks an utterance is embedded from.

    Up to ``max_samples`` the whole utterance is one chunk. Longer ones are cut into
    consecutive ``max_samples`` chunks; a remainder of at least ``min_samples`` is a
    chunk of its own, a shorter one is covered by the last full window instead.
    """
    if num_samples < 1:
        raise ValueError("cannot embed an empty waveform")
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if num_samples <= max_samples:
        return [(0, num_samples)]
    full = num_samples // max_samples
    bounds = [(i * max_samples, (i + 1) * max_samples) for i in range(full)]
    rest = num_samples - full * max_samples
    if rest >= min_samples:
        bounds.append((full * max_samples, num_samples))
    elif rest > 0:
        bounds.append((num_samples - max_samples, num_samples))
    return bounds


def max_samples(max_seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples in ``max_seconds``; a clear error for a non-positive or non-finite duration."""
    if not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
    return max(1, int(round(max_seconds * sample_rate)))


def encode(encoder: torch.nn.Module, batch: np.ndarray, device: torch.device) -> np.ndarray:
    """One forward pass of an equal-length (B, samples) batch → (B, D) float32."""
    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
    with torch.inference_mode(), torch.autocast(
        device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        out = encoder(x)
    out = out.float().cpu().numpy()
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(
            f"encoder returned shape {tuple(out.shape)} for a batch of {batch.shape[0]} waveforms; expected (B, D)"
        )
    return out


def embed_equal_length(
    encoder: torch.nn.Module,
    waves: list[np.ndarray],
    max_seconds: float,
    device: str | torch.device,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_batch: int = MAX_GROUP_BATCH,
    normalize: bool = True,
) -> np.ndarray:
    """Unit-length embeddings ``(N, D)`` of ``waves``, batching only chunks of identical length.

    Each utterance is split by :func:`chunk_bounds`; every chunk's embedding is
    L2-normalised, an utterance's chunks are averaged and the mean re-normalised.
    ``normalize=False`` gives the encoder's raw output instead (the mean of the raw chunk
    embeddings), as the reference clusters.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    device = torch.device(device)
    limit = max_samples(max_seconds, sample_rate)
    min_samples = int(round(MIN_CHUNK_SECONDS * sample_rate))
    chunks: list[np.ndarray] = []
    owner: list[int] = []
    for i, wave in enumerate(waves):
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"waveform {i} must be 1-D, got shape {wave.shape}")
        if wave.size == 0:
            raise ValueError(f"waveform {i} is empty")
        for start, end in chunk_bounds(wave.size, limit, min_samples):
            chunks.append(wave[start:end])
            owner.append(i)
    if not chunks:
        raise ValueError("no waveforms to embed")
    by_length: dict[int, list[int]] = defaultdict(list)
    for c, chunk in enumerate(chunks):
        by_length[chunk.size].append(c)
    chunk_emb: np.ndarray | None = None
    for length in sorted(by_length):
        members = by_length[length]
        for start in range(0, len(members), max_batch):
            ids = members[start : start + max_batch]
            out = encode(encoder, np.stack([chunks[c] for c in ids]), device)
            if chunk_emb is None:
                chunk_emb = np.empty((len(chunks), out.shape[1]), dtype=np.float32)
            chunk_emb[ids] = out
    assert chunk_emb is not None
    if normalize:
        chunk_emb = l2_normalize(chunk_emb)
    sums = np.zeros((len(waves), chunk_emb.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(owner), chunk_emb.astype(np.float64))
    if not normalize:
        return (sums / np.bincount(owner, minlength=len(waves))[:, None]).astype(np.float32)
    return l2_normalize(sums).astype(np.float32)


def utterance_embedding(
    encoder: torch.nn.Module,
    wave: np.ndarray,
    max_seconds: float,
    device: str | torch.device,
    *,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Unit-length (D,) embedding of a whole utterance (mean over ``max_seconds`` chunks when longer)."""
    return embed_equal_length(encoder, [wave], max_seconds, device, sample_rate=sample_rate)[0]


def crop_rng(seed: int, wave: np.ndarray) -> np.random.Generator:
    """Random generator for an utterance's evaluation crops, fixed by ``seed`` and the audio itself.

    Keyed on the samples (CRC-32 of the float32 bytes) rather than a file name, so
    the same audio gets the same crops in trial evaluation and in ``SpeakerModel.embed``.
    """
    data = np.ascontiguousarray(wave, dtype=np.float32)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(data.tobytes()), data.size])


def _embed(embed_fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    out = np.asarray(embed_fn(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(
            f"embed_fn must return ({batch.shape[0]}, D) for a batch of {batch.shape[0]}, got {out.shape}"
        )
    return out


def crop_starts(length: int, crop_samples: int, count: int, positions: str, rng: np.random.Generator) -> np.ndarray:
    """Where ``count`` crops of ``crop_samples`` start in ``length`` samples: evenly spaced (first at 0,
    last at the end, as ``numpy.linspace``) or uniformly at random."""
    room = max(length - crop_samples, 0)
    if positions == "even":
        return np.linspace(0, room, num=count).round().astype(np.int64)
    if positions == "random":
        return rng.integers(0, room + 1, size=count)
    raise ValueError(f"crop positions must be 'even' or 'random', got {positions!r}")


def trial_vector(
    embed_fn: Callable[[np.ndarray], np.ndarray], wave: np.ndarray, protocol: TrialProtocol,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """The vector a file is scored by under ``protocol`` (``embed_fn``: (B, samples) → (B, D)).

    ``fusion: score`` gives ``[f, c̄] / √2`` (f the whole file's unit embedding, c̄ the mean of
    the crops' unit embeddings), so the dot product of two files' vectors is exactly
    ½ · f·f′ + ½ · mean over crop pairs of c·c′. ``fusion: embedding`` gives the unit mean of
    f and the crops. With no crops both are f.
    """
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"a trial file must be a non-empty 1-D wave, got shape {wave.shape}")
    if protocol.crops < 0:
        raise ValueError(f"crops must be >= 0, got {protocol.crops}")
    full = l2_normalize(_embed(embed_fn, wave[None, :]))[0]
    if protocol.crops == 0:
        return full.astype(np.float32)
    crop_samples = max_samples(protocol.crop_seconds, sample_rate)
    padded = wave if wave.size >= crop_samples else np.resize(wave, crop_samples)  # short files wrap around
    if padded.size == crop_samples:  # every crop is the whole (wrapped) file: embed it once
        crops = np.repeat(l2_normalize(_embed(embed_fn, padded[None, :])), protocol.crops, axis=0)
    else:
        starts = crop_starts(padded.size, crop_samples, protocol.crops, protocol.positions,
                             crop_rng(protocol.seed, wave))
        crops = l2_normalize(_embed(embed_fn, np.stack([padded[s : s + crop_samples] for s in starts])))
    if protocol.fusion == "embedding":
        return l2_normalize(np.concatenate([full[None], crops]).mean(axis=0)).astype(np.float32)
    if protocol.fusion != "score":
        raise ValueError(f"fusion must be 'score' or 'embedding', got {protocol.fusion!r}")
    return (np.concatenate([full, crops.mean(axis=0)]) / math.sqrt(2.0)).astype(np.float32)


def fused_cohort(cohort: np.ndarray) -> np.ndarray:
    """Whole-file cohort embeddings in the ``fusion: score`` form, as if every crop agreed with its file."""
    unit = l2_normalize(np.asarray(cohort, dtype=np.float32))
    return (np.concatenate([unit, unit], axis=1) / math.sqrt(2.0)).astype(np.float32)


def trial_embedding(
    encoder: torch.nn.Module,
    wave: np.ndarray,
    protocol: TrialProtocol,
    device: str | torch.device,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """:func:`trial_vector` with an encoder (long files in ``max_seconds`` chunks)."""

    def embed_fn(batch: np.ndarray) -> np.ndarray:
        return embed_equal_length(encoder, list(batch), protocol.max_seconds, device, sample_rate=sample_rate)

    return trial_vector(embed_fn, wave, protocol, sample_rate)
