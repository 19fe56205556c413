"""The Ray actor pool that embeds: every utterance of a shard folder, or a set of audio files.

Each actor loads the checkpoint once (one GPU each when the cluster has GPUs, else CPU
actors) and embeds with :mod:`raysv.embedding.core`. Extraction checks that every
``utt_index`` of the shards comes back exactly once before it writes anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raysv.artifacts.checkpoint import read_model_json
from raysv.artifacts.embeddings import write_embeddings
from raysv.artifacts.jsonio import write_json
from raysv.artifacts.shards import shard_utt_index
from raysv.audio.io import SAMPLE_RATE, decode_audio, read_audio, resample
from raysv.embedding.core import (
    TrialProtocol,
    embed_equal_length,
    max_samples,
    trial_embedding,
)
from raysv.errors import InputError
from raysv.runtime import ensure_ray, torch_device
from raysv.runtime import use_gpu as resolve_gpu

log = logging.getLogger(__name__)

DEFAULT_CPU_ACTORS = 2
ACTOR_START_TIMEOUT_S = 600
"""How long the pool may take to start all its actors (a cluster may add nodes first)."""
EMBEDDINGS_FILE = "embeddings.parquet"
MARKER_FILE = "extract.json"
FBANK_MEAN = "fbank-mean"  # the checkpoint name of the untrained baseline


@dataclass
class ExtractConfig:
    """``extract``: embedding every training utterance for clustering."""

    max_seconds: float = 20.0
    batch_size: int = 16
    num_actors: int | None = None  # default: one per GPU, else 2 CPU actors
    normalize: bool = True  # unit-length embeddings; false: the encoder's raw output (the reference clusters those)


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
        protocol: dict[str, Any] | None = None,
        normalize: bool = True,
    ) -> None:
        from raysv.models import load_encoder

        self.device = torch_device(use_gpu)
        if checkpoint == FBANK_MEAN:  # the untrained baseline: nothing to load
            self.encoder, self.meta = None, {"sample_rate": SAMPLE_RATE}
        else:
            self.encoder, self.meta = load_encoder(checkpoint, self.device)
        self.sample_rate = int(self.meta.get("sample_rate", SAMPLE_RATE))
        max_samples(max_seconds, self.sample_rate)
        self.max_seconds = float(max_seconds)
        self.protocol = TrialProtocol(**(protocol or {"crops": 0, "max_seconds": max_seconds}))
        self.normalize = bool(normalize)
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
            from raysv.embedding.baseline import fbank_mean_embedding

            limit = max_samples(self.max_seconds, self.sample_rate)
            emb = np.stack([fbank_mean_embedding(w[:limit], self.sample_rate) for w in waves])
        else:
            emb = embed_equal_length(self.encoder, waves, self.max_seconds, self.device, sample_rate=self.sample_rate,
                                     normalize=self.normalize)
        return {"utt_index": utt_index, "embedding": emb, "pid": np.full(len(utt_index), self.pid, dtype=np.int64)}

    def _embed_files(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Trial vectors of files; a file that fails (undecodable, empty, NaN) is reported by name, not raised."""
        keys = [str(k) for k in batch["key"]]
        out: list[np.ndarray | None] = []
        errors = []
        for path in batch["path"]:
            try:
                wave = read_audio(str(path), self.sample_rate)
                if wave.size == 0:
                    raise ValueError("the audio is empty")
                out.append(trial_embedding(self.encoder, wave, self.protocol, self.device, self.sample_rate))
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - named in the driver's one error, never a Ray "UDF failed"
                out.append(None)
                errors.append(f"{path}: {getattr(exc, 'reason', None) or exc}")
        dim = next((len(v) for v in out if v is not None), self.vector_dim)
        vectors = np.stack([v if v is not None else np.full(dim, np.nan, np.float32) for v in out]).astype(np.float32)
        return {
            "key": np.asarray(keys, dtype=object),
            "embedding": vectors,
            "error": np.asarray(errors, dtype=object),
            "pid": np.full(len(keys), self.pid, dtype=np.int64),
        }

    @property
    def vector_dim(self) -> int:
        dim = int(self.meta.get("embed_dim", 1))
        return dim if self.protocol.cosine else 2 * dim


# --------------------------------------------------------------------------- drivers


def _plan_actors(num_actors: int | None, use_gpu: bool | None) -> tuple[int, bool]:
    """Actor count and device: one GPU per actor when the cluster has GPUs, else CPU actors."""
    import ray

    ensure_ray()
    gpu = resolve_gpu("auto" if use_gpu is None else use_gpu)
    if num_actors is None:
        num_actors = int(ray.cluster_resources().get("GPU", 0)) if gpu else DEFAULT_CPU_ACTORS
    if num_actors < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    return int(num_actors), bool(gpu)


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


def _gather(ds: Any, key: str, errors: list[str] | None = None) -> tuple[list[np.ndarray], list[np.ndarray], set[int]]:
    keys: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    pids: set[int] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch[key]) == 0:
            continue
        keys.append(np.asarray(batch[key]))
        embs.append(np.asarray(batch["embedding"], dtype=np.float32))
        pids.update(int(p) for p in np.unique(batch["pid"]))
        if errors is not None and "error" in batch:
            errors.extend(str(e) for e in batch["error"] if e)
    return keys, embs, pids


def _describe(values: Iterable[int], limit: int = 10) -> str:
    values = sorted(values)
    more = f" … ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(str(v) for v in values[:limit]) + more


def _rows_in(batch: pa.Table, keep: pa.Array) -> pa.Table:
    return batch.filter(pc.is_in(batch["utt_index"], value_set=keep))


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
    normalize: bool = True,
    utt_indices: np.ndarray | None = None,
) -> dict[str, Any]:
    """Embed every utterance of a shard folder into ``out/embeddings.parquet``; ``out/extract.json`` marks completion.

    ``utt_indices`` embeds only those rows (an AS-norm cohort: a sample, not the whole corpus);
    the rows are still read, which costs little beside the encoder.

    ``checkpoint`` is a raysv model folder, or ``"fbank-mean"`` for the untrained
    baseline (to compare the clustering of a trained encoder against).

    A pool of ``num_actors`` actors (one GPU each when the cluster has GPUs,
    otherwise 2 CPU actors) each loads the checkpoint once. Every ``utt_index``
    of the shards must come back exactly once, or nothing is marked complete.
    """
    from raysv.data.pipelines import read_shards

    out = Path(out)
    if str(checkpoint) != FBANK_MEAN:
        checkpoint = Path(checkpoint)
        read_model_json(checkpoint)  # fails early, naming the folder, when it is not a checkpoint
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_samples(max_seconds, SAMPLE_RATE)
    expected = shard_utt_index(shards)
    if utt_indices is not None:
        wanted = np.unique(np.asarray(utt_indices, dtype=np.int64))
        unknown = np.setdiff1d(wanted, expected)
        if unknown.size:
            raise ValueError(f"utt_index [{_describe(unknown)}] not in the shards of {shards}")
        expected = wanted
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER_FILE
    marker.unlink(missing_ok=True)
    num_actors, use_gpu = _plan_actors(num_actors, use_gpu)

    start = time.perf_counter()
    ds = read_shards(shards, columns=["utt_index", "audio"])
    if utt_indices is not None:
        ds = ds.map_batches(_rows_in, fn_kwargs={"keep": pa.array(expected)}, batch_format="pyarrow")
    actor_kwargs = {"checkpoint": str(checkpoint), "max_seconds": max_seconds, "use_gpu": use_gpu,
                    "normalize": normalize}
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
        "normalize": bool(normalize),
        "batch_size": int(batch_size),
        "checkpoint": str(checkpoint),
        "shards": str(shards),
        "embeddings": str(out / EMBEDDINGS_FILE),
    }
    write_json(marker, info)
    log.info(
        "extracted %d embeddings (dim %d) in %.1f s with %d %s actor(s)",
        info["count"], info["dim"], seconds, len(pids), "GPU" if use_gpu else "CPU",
    )
    return info


def embed_files(
    checkpoint: str | Path,
    files: dict[str, Path],
    *,
    protocol: TrialProtocol | None = None,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
) -> dict[str, np.ndarray]:
    """Trial vectors of audio files under ``protocol`` (default: whole files), keyed like ``files``,
    computed by the actor pool (:func:`raysv.embedding.core.trial_embedding`)."""
    checkpoint = Path(checkpoint)
    read_model_json(checkpoint)
    if not files:
        raise ValueError("embed_files needs at least one file")
    protocol = protocol or TrialProtocol(crops=0)
    if protocol.crops < 0:
        raise ValueError(f"crops must be >= 0, got {protocol.crops}")
    max_samples(protocol.max_seconds, SAMPLE_RATE)
    if protocol.crops > 0:
        max_samples(protocol.crop_seconds, SAMPLE_RATE)
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
        {"checkpoint": str(checkpoint), "max_seconds": protocol.max_seconds, "use_gpu": use_gpu,
         "protocol": dataclasses.asdict(protocol)},
    )
    errors: list[str] = []
    key_parts, emb_parts, _ = _gather(ds, "key", errors)
    if errors:
        more = f" … and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise InputError(f"{len(errors)} audio file(s) could not be embedded: {'; '.join(sorted(errors)[:10])}{more}")
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
