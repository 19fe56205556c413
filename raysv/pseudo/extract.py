"""Embedding extraction: one embedding per utterance, by a pool of Ray Data actors.

The same code embeds a shard folder (for clustering) and a set of audio files
(for trials). Batches only ever hold waveforms of exactly the same length, so
nothing is padded and an utterance's embedding never depends on which other
utterances shared its batch (padding changes WavLM's group-normalised feature
encoder and any attention pooling).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raysv.audio.io import decode_audio, read_audio, resample
from raysv.evaluation.scoring import l2_normalize, multicrop_embedding
from raysv.pseudo.embeddings import write_embeddings

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_CHUNK_SECONDS = 1.0
"""A trailing chunk shorter than this is replaced by the last full window: too short to describe a speaker."""
MAX_GROUP_BATCH = 64
"""Largest number of equal-length waveforms sent through the encoder at once (bounds memory for long files)."""
DEFAULT_CPU_ACTORS = 2
ACTOR_START_TIMEOUT_S = 600
"""How long the pool may take to start all its actors (a cluster may add nodes first)."""
EMBEDDINGS_FILE = "embeddings.parquet"
MARKER_FILE = "extract.json"
FBANK_MEAN = "fbank-mean"  # the checkpoint name of the untrained baseline


# --------------------------------------------------------------------------- chunking and batching


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


def _max_samples(max_seconds: float, sample_rate: int) -> int:
    if not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds) and max_seconds > 0):
        raise ValueError(f"max_seconds must be a positive number, got {max_seconds!r}")
    return max(1, int(round(max_seconds * sample_rate)))


def _encode(encoder: torch.nn.Module, batch: np.ndarray, device: torch.device) -> np.ndarray:
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
) -> np.ndarray:
    """Unit-length embeddings ``(N, D)`` of ``waves``, batching only chunks of identical length.

    Each utterance is split by :func:`chunk_bounds`; every chunk's embedding is
    L2-normalised, an utterance's chunks are averaged and the mean re-normalised.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    device = torch.device(device)
    max_samples = _max_samples(max_seconds, sample_rate)
    min_samples = int(round(MIN_CHUNK_SECONDS * sample_rate))
    chunks: list[np.ndarray] = []
    owner: list[int] = []
    for i, wave in enumerate(waves):
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"waveform {i} must be 1-D, got shape {wave.shape}")
        if wave.size == 0:
            raise ValueError(f"waveform {i} is empty")
        for start, end in chunk_bounds(wave.size, max_samples, min_samples):
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
            out = _encode(encoder, np.stack([chunks[c] for c in ids]), device)
            if chunk_emb is None:
                chunk_emb = np.empty((len(chunks), out.shape[1]), dtype=np.float32)
            chunk_emb[ids] = out
    assert chunk_emb is not None
    chunk_emb = l2_normalize(chunk_emb)
    sums = np.zeros((len(waves), chunk_emb.shape[1]), dtype=np.float64)
    np.add.at(sums, np.asarray(owner), chunk_emb.astype(np.float64))
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


def evaluation_embedding(
    encoder: torch.nn.Module,
    wave: np.ndarray,
    *,
    crops: int,
    crop_seconds: float,
    max_seconds: float,
    seed: int,
    device: str | torch.device,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """Mean of the whole-utterance embedding and ``crops`` random crops, re-normalised (the trial embedding)."""
    if crops < 0:
        raise ValueError(f"crops must be >= 0, got {crops}")
    crop_samples = _max_samples(crop_seconds, sample_rate) if crops > 0 else 1

    def embed_fn(batch: np.ndarray) -> np.ndarray:
        return embed_equal_length(encoder, list(batch), max_seconds, device, sample_rate=sample_rate)

    return multicrop_embedding(embed_fn, wave, crops, crop_samples, crop_rng(seed, wave)).astype(np.float32)


# --------------------------------------------------------------------------- the actor


def _resolve_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but CUDA is not available in this process; pass use_gpu=False")
    return torch.device("cuda")


class EmbeddingActor:
    """Ray Data callable: loads the checkpoint once, then embeds batches of shard rows or audio files.

    Shard batches (``utt_index`` + FLAC ``audio``) give ``{utt_index, embedding, pid}``;
    file batches (``key`` + ``path``) give ``{key, embedding, pid}`` with the evaluation
    multi-crop embedding (``crops`` random crops of ``crop_seconds``).
    """

    def __init__(
        self,
        checkpoint: str,
        max_seconds: float,
        use_gpu: bool,
        *,
        crops: int = 0,
        crop_seconds: float = 4.0,
        seed: int = 0,
    ) -> None:
        from raysv.train.checkpoint import load_encoder

        self.device = _resolve_device(use_gpu)
        if checkpoint == FBANK_MEAN:  # the untrained baseline: nothing to load
            self.encoder, self.meta = None, {"sample_rate": SAMPLE_RATE}
        else:
            self.encoder, self.meta = load_encoder(checkpoint, self.device)
        self.sample_rate = int(self.meta.get("sample_rate", SAMPLE_RATE))
        _max_samples(max_seconds, self.sample_rate)
        self.max_seconds = float(max_seconds)
        self.crops = int(crops)
        self.crop_seconds = float(crop_seconds)
        self.seed = int(seed)
        self.pid = os.getpid()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "audio" in batch:
            return self._embed_shard_rows(batch)
        if "path" in batch:
            return self._embed_files(batch)
        raise KeyError(f"EmbeddingActor needs an 'audio' (shards) or 'path' (files) column, got {sorted(batch)}")

    def _embed_shard_rows(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        utt_index = np.asarray(batch["utt_index"], dtype=np.int64)
        waves = []
        for idx, data in zip(utt_index, batch["audio"]):
            try:
                wave, rate = decode_audio(data)
            except Exception as exc:
                raise ValueError(f"utt_index {int(idx)}: {exc}") from exc
            if wave.size == 0:
                raise ValueError(f"utt_index {int(idx)}: the audio is empty")
            waves.append(resample(wave, rate, self.sample_rate))
        if self.encoder is None:
            from raysv.evaluation.baseline import fbank_mean_embedding

            limit = _max_samples(self.max_seconds, self.sample_rate)
            emb = np.stack([fbank_mean_embedding(w[:limit], self.sample_rate) for w in waves])
        else:
            emb = embed_equal_length(self.encoder, waves, self.max_seconds, self.device, sample_rate=self.sample_rate)
        return {"utt_index": utt_index, "embedding": emb, "pid": np.full(len(utt_index), self.pid, dtype=np.int64)}

    def _embed_files(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        out = []
        for key, path in zip(keys, batch["path"]):
            wave = read_audio(str(path), self.sample_rate)
            if wave.size == 0:
                raise ValueError(f"{path}: the audio is empty")
            out.append(
                evaluation_embedding(
                    self.encoder,
                    wave,
                    crops=self.crops,
                    crop_seconds=self.crop_seconds,
                    max_seconds=self.max_seconds,
                    seed=self.seed,
                    device=self.device,
                    sample_rate=self.sample_rate,
                )
            )
        return {
            "key": np.asarray(keys, dtype=object),
            "embedding": np.stack(out).astype(np.float32),
            "pid": np.full(len(keys), self.pid, dtype=np.int64),
        }


# --------------------------------------------------------------------------- drivers


def _ensure_ray() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init()
    return ray


def _plan_actors(num_actors: int | None, use_gpu: bool | None) -> tuple[int, bool]:
    """Actor count and device: one GPU per actor when the cluster has GPUs, else CPU actors."""
    ray = _ensure_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu is None:
        use_gpu = gpus > 0
    if use_gpu and gpus == 0:
        raise RuntimeError("use_gpu=True but the Ray cluster reports no GPU; pass use_gpu=False")
    if num_actors is None:
        num_actors = gpus if use_gpu else DEFAULT_CPU_ACTORS
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    return int(num_actors), bool(use_gpu)


def _map_with_actors(ds: Any, batch_size: int, num_actors: int, use_gpu: bool, actor_kwargs: dict[str, Any]) -> Any:
    from ray.data import ActorPoolStrategy

    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    # Blocks of one batch each: small inputs are otherwise read as a single block that
    # only one actor would ever see.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    # Start every actor (model loaded) before data flows, so the first one up does not take
    # all the work; this dataset's own context, the global one is left alone.
    ds.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    return ds.map_batches(
        EmbeddingActor,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=num_actors),
        **resources,
    )


def _gather(ds: Any, key: str) -> tuple[list[np.ndarray], list[np.ndarray], set[int]]:
    keys: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    pids: set[int] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch[key]) == 0:
            continue
        keys.append(np.asarray(batch[key]))
        embs.append(np.asarray(batch["embedding"], dtype=np.float32))
        pids.update(int(p) for p in np.unique(batch["pid"]))
    return keys, embs, pids


def _shard_utt_index(shards: str | Path) -> np.ndarray:
    """Every ``utt_index`` of the shard files, read from that column alone (the expected output)."""
    import pyarrow.parquet as pq

    from raysv.data.shards import shard_files

    parts = [pq.read_table(f, columns=["utt_index"]).column("utt_index").to_numpy() for f in shard_files(shards)]
    return np.concatenate(parts).astype(np.int64)


def _describe(values: Iterable[int], limit: int = 10) -> str:
    values = sorted(values)
    more = f" … ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(str(v) for v in values[:limit]) + more


def check_coverage(expected: np.ndarray, produced: np.ndarray, source: str) -> None:
    """Raise unless ``produced`` (sorted) holds every ``expected`` utt_index exactly once and nothing else."""
    produced = np.asarray(produced, dtype=np.int64)
    repeated = np.unique(produced[1:][produced[1:] == produced[:-1]])
    if repeated.size:
        raise RuntimeError(f"extraction from {source} produced utt_index {_describe(repeated)} more than once")
    missing = np.setdiff1d(expected, produced)
    extra = np.setdiff1d(produced, expected)
    if missing.size or extra.size:
        raise RuntimeError(
            f"extraction from {source} does not match its shards: missing utt_index [{_describe(missing)}], "
            f"unexpected [{_describe(extra)}]"
        )


def extract_embeddings(
    checkpoint: str | Path,
    shards: str | Path,
    out: str | Path,
    *,
    max_seconds: float = 20.0,
    batch_size: int = 16,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Embed every utterance of a shard folder into ``out/embeddings.parquet``; ``out/extract.json`` marks completion.

    ``checkpoint`` is a raysv model folder, or ``"fbank-mean"`` for the untrained
    baseline (to compare the clustering of a trained encoder against).

    A pool of ``num_actors`` actors (one GPU each when the cluster has GPUs,
    otherwise 2 CPU actors) each loads the checkpoint once. Every ``utt_index``
    of the shards must come back exactly once, or nothing is marked complete.
    """
    from raysv.data.shards import read_shards
    from raysv.train.checkpoint import read_model_json

    out = Path(out)
    if str(checkpoint) != FBANK_MEAN:
        checkpoint = Path(checkpoint)
        read_model_json(checkpoint)  # fails early, naming the folder, when it is not a checkpoint
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _max_samples(max_seconds, SAMPLE_RATE)
    expected = _shard_utt_index(shards)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER_FILE
    marker.unlink(missing_ok=True)
    num_actors, use_gpu = _plan_actors(num_actors, use_gpu)

    start = time.perf_counter()
    ds = read_shards(shards, columns=["utt_index", "audio"])
    actor_kwargs = {"checkpoint": str(checkpoint), "max_seconds": max_seconds, "use_gpu": use_gpu}
    ds = _map_with_actors(ds, batch_size, num_actors, use_gpu, actor_kwargs)
    idx_parts, emb_parts, pids = _gather(ds, "utt_index")
    if not idx_parts:
        raise ValueError(f"no embeddings were produced from {shards}")
    utt_index = np.concatenate(idx_parts).astype(np.int64)
    embeddings = np.concatenate(emb_parts)
    order = np.argsort(utt_index, kind="stable")
    utt_index, embeddings = utt_index[order], embeddings[order]

    check_coverage(expected, utt_index, str(shards))

    write_embeddings(out / EMBEDDINGS_FILE, utt_index, embeddings)
    seconds = time.perf_counter() - start
    info = {
        "count": int(utt_index.size),
        "dim": int(embeddings.shape[1]),
        "seconds": round(seconds, 3),
        "actor_pids": sorted(pids),
        "num_actors": num_actors,
        "use_gpu": use_gpu,
        "max_seconds": float(max_seconds),
        "batch_size": int(batch_size),
        "checkpoint": str(checkpoint),
        "shards": str(shards),
        "embeddings": str(out / EMBEDDINGS_FILE),
    }
    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(marker)
    log.info(
        "extracted %d embeddings (dim %d) in %.1f s with %d %s actor(s)",
        info["count"], info["dim"], seconds, len(pids), "GPU" if use_gpu else "CPU",
    )
    return info


def embed_files(
    checkpoint: str | Path,
    files: dict[str, Path],
    *,
    crops: int = 0,
    crop_seconds: float = 4.0,
    max_seconds: float = 30.0,
    seed: int = 0,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
) -> dict[str, np.ndarray]:
    """Evaluation embeddings of audio files, keyed like ``files``, computed by the actor pool.

    Each file's embedding is the mean of its whole-utterance embedding and ``crops``
    random ``crop_seconds`` crops (the crops fixed by ``seed`` and the audio), unit length.
    """
    from raysv.train.checkpoint import read_model_json

    checkpoint = Path(checkpoint)
    read_model_json(checkpoint)
    if not files:
        raise ValueError("embed_files needs at least one file")
    if crops < 0:
        raise ValueError(f"crops must be >= 0, got {crops}")
    _max_samples(max_seconds, SAMPLE_RATE)
    if crops > 0:
        _max_samples(crop_seconds, SAMPLE_RATE)
    missing = [k for k, p in files.items() if not Path(p).is_file()]
    if missing:
        shown = ", ".join(str(files[k]) for k in missing[:5])
        raise FileNotFoundError(f"{len(missing)} audio file(s) do not exist: {shown}")
    num_actors, use_gpu = _plan_actors(num_actors, use_gpu)

    import ray

    items = [{"key": str(k), "path": str(p)} for k, p in files.items()]
    batch_size = max(1, min(32, math.ceil(len(items) / (4 * num_actors))))
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * num_actors * 8)))
    ds = _map_with_actors(
        ds,
        batch_size,
        num_actors,
        use_gpu,
        {
            "checkpoint": str(checkpoint),
            "max_seconds": max_seconds,
            "use_gpu": use_gpu,
            "crops": crops,
            "crop_seconds": crop_seconds,
            "seed": seed,
        },
    )
    key_parts, emb_parts, _ = _gather(ds, "key")
    result: dict[str, np.ndarray] = {}
    repeated: set[str] = set()
    for keys, embs in zip(key_parts, emb_parts):
        for k, e in zip(keys, embs):
            k = str(k)
            if k in result:
                repeated.add(k)
            result[k] = e
    lost = [k for k in map(str, files) if k not in result]
    if repeated or lost:
        raise RuntimeError(
            f"embed_files: {len(lost)} file(s) got no embedding ({lost[:5]}), {len(repeated)} got several"
        )
    return result
