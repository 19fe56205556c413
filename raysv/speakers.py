"""Enrolled speakers: a Parquet file of names and embeddings, and identification against it.

Layout of the database file (one row per speaker)::

    name       string     the speaker's name, unique
    sum        float32[D] the sum of the unit embeddings of the files enrolled so far
    count      int64      how many files those are

A speaker's embedding is ``sum / ‖sum‖`` (the normalised mean of its files), so enrolling
more files later only adds to ``sum`` and ``count``. Identification scores a file's unit
embedding against every speaker by cosine — one matrix product, well under a second for
100,000 speakers — and answers "unknown" below the model's threshold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Match:
    name: str  # the speaker, or "unknown" when the best score is below the threshold
    score: float  # cosine of the file and the speaker's embedding, in [-1, 1]
    speaker: str  # the best-scoring enrolled speaker, even when the answer is unknown


class SpeakerDB:
    """Names and summed embeddings; ``path`` None keeps them in memory only."""

    def __init__(self, path: str | Path | None = None, dim: int | None = None):
        self.path = Path(path) if path is not None else None
        self.names: list[str] = []
        self.sums = np.zeros((0, dim or 0), dtype=np.float32)
        self.counts = np.zeros(0, dtype=np.int64)
        self._index: dict[str, int] = {}
        if self.path is not None and self.path.exists():
            self._load()
        if dim is not None and self.sums.shape[1] not in (0, dim):
            raise ValueError(f"{self.path}: holds {self.sums.shape[1]}-d embeddings, this model makes {dim}-d ones")

    def __len__(self) -> int:
        return len(self.names)

    def _load(self) -> None:
        try:
            table = pq.read_table(self.path, columns=["name", "sum", "count"])
        except (pa.ArrowInvalid, KeyError, OSError) as err:
            raise ValueError(f"{self.path} is not a raysv speaker database (name, sum, count): {err}") from None
        self.names = [str(n) for n in table.column("name").to_pylist()]
        column = table.column("sum").combine_chunks()
        dim = column.type.list_size
        self.sums = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        self.counts = table.column("count").to_numpy().astype(np.int64)
        self._index = {n: i for i, n in enumerate(self.names)}

    def add(self, name: str, embeddings: np.ndarray) -> int:
        """Enrol (or add to) ``name`` with file embeddings ``(n, D)``; returns its file count."""
        if not name or name == UNKNOWN:
            raise ValueError(f"a speaker name must be non-empty and not {UNKNOWN!r}, got {name!r}")
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        if self.sums.shape[1] == 0:
            self.sums = np.zeros((len(self.names), emb.shape[1]), dtype=np.float32)
        if emb.shape[1] != self.sums.shape[1]:
            raise ValueError(f"embeddings of dimension {emb.shape[1]} for a database of {self.sums.shape[1]}-d ones")
        i = self._index.get(name)
        if i is None:
            i = len(self.names)
            self.names.append(name)
            self._index[name] = i
            self.sums = np.vstack([self.sums, np.zeros((1, emb.shape[1]), np.float32)])
            self.counts = np.append(self.counts, 0)
        self.sums[i] += emb.sum(axis=0)
        self.counts[i] += len(emb)
        return int(self.counts[i])

    def embeddings(self) -> np.ndarray:
        """Each speaker's unit embedding, ``(speakers, D)``."""
        return self.sums / np.maximum(np.linalg.norm(self.sums, axis=1, keepdims=True), 1e-12)

    def identify(self, embedding: np.ndarray, threshold: float | None, top: int = 1) -> list[Match]:
        """The ``top`` best speakers for one embedding; below ``threshold`` the name is "unknown"."""
        if not self.names:
            raise ValueError(f"no speakers enrolled{f' in {self.path}' if self.path else ''}")
        e = np.asarray(embedding, dtype=np.float32).ravel()
        scores = self.embeddings() @ (e / max(float(np.linalg.norm(e)), 1e-12))
        best = np.argsort(-scores)[: max(1, top)]
        return [Match(self.names[i] if threshold is None or scores[i] >= threshold else UNKNOWN,
                      float(scores[i]), self.names[i]) for i in best]

    def save(self) -> Path:
        """Write the database (atomically) to its path."""
        if self.path is None:
            raise ValueError("this speaker database has no file: give SpeakerDB a path to save it")
        dim = self.sums.shape[1]
        values = pa.array(np.ascontiguousarray(self.sums, dtype=np.float32).reshape(-1), type=pa.float32())
        table = pa.table({"name": pa.array(self.names, pa.string()),
                          "sum": pa.FixedSizeListArray.from_arrays(values, dim),
                          "count": pa.array(self.counts, pa.int64())})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        return self.path
