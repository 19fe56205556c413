"""Pseudo speaker labels: k-means of the embeddings, then Ward clustering of the k-means centroids.

k-means with many centroids (k1) over-segments speakers into pure groups; Ward
merges of those centroids (k1 -> k2) then join groups of the same speaker,
which raises NMI over k-means straight into k2 (reference: 0.955 vs 0.930).
k-means runs in faiss (GPU when present); Ward runs in fastcluster's
``linkage_vector``, which needs O(k1 * D) memory instead of the O(k1^2)
distance matrix of a dense linkage (50,000 centroids: ~100 MB instead of ~10 GB).
``k1: null`` skips k-means and runs Ward on the utterances themselves, which a corpus
of up to :data:`WARD_UTTERANCES_MAX` utterances affords. Ward of the centroids weighs
each centroid as one point whatever its size; on the toy corpora (1,200-1,280 utterances,
k1 320) Ward of the utterances gave clusters 0.03-0.09 purer that keep about as many of each
speaker's utterance pairs together (docs/toy-corpora.md).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from raysv.config import ConfigError, check_choice, check_positive
from raysv.errors import InputError
from raysv.pseudo.lda import LdaConfig, refine_labels

log = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    """``cluster``: k-means into ``k1`` groups, then Ward clustering of the centroids into ``k2``
    (``k1: null``: Ward of the utterances themselves)."""

    k1: int | None = 50000  # null: no k-means, Ward of the utterances themselves (up to WARD_UTTERANCES_MAX)
    # a number, auto (the Ward cut of best silhouette, 10 groups or more: a count only where the
    # embeddings show one, see docs/toy-corpora.md), or null (k-means clusters as they are)
    k2: int | str | None = 7500
    k2_factor: float = 1.0  # with k2: auto, over-cluster: this many groups per estimated speaker
    k2_fallback: int | None = None  # with k2: auto, the groups where no count shows (null: stop with an error)
    min_cluster_size: int = 0
    niter: int = 20
    seed: int = 0
    metric: str = "euclidean"  # euclidean: k-means of the raw embeddings (the reference) | cosine: spherical
    kmeans: str = "auto"  # flat | two_level (faiss's hierarchical k-means) | auto: two_level for large problems
    keep: float = 1.0  # fraction of utterances labelled: those closest to their group against the next (-1: the rest)
    lda: LdaConfig = field(default_factory=LdaConfig)  # passes of LDA on the labels and clustering again there

    def validate(self, prefix: str = "cluster") -> None:
        self.lda.validate(f"{prefix}.lda")
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"{prefix}.keep: a fraction in (0, 1], got {self.keep!r}")
        check_choice(f"{prefix}.metric", self.metric, METRICS)
        check_choice(f"{prefix}.kmeans", self.kmeans, KMEANS_METHODS)
        check_positive(f"{prefix}.k1", self.k1)
        check_positive(f"{prefix}.k2_factor", self.k2_factor)
        check_positive(f"{prefix}.k2_fallback", self.k2_fallback)
        if self.k1 is None:  # Ward of the utterances: k2 is checked against their number when clustering
            if self.k2 is None:
                raise ConfigError(f"{prefix}.k1 and {prefix}.k2 are both null: every utterance would be its own class; "
                                  f"set k2 (a number or auto)")
            return self._validate_k2(prefix)
        if self.k2_fallback is not None and self.k2_fallback >= self.k1:
            raise ConfigError(f"{prefix}.k2_fallback ({self.k2_fallback}) must be smaller than {prefix}.k1 ({self.k1})")
        self._validate_k2(prefix)
        if isinstance(self.k2, int) and self.k2 >= self.k1:
            raise ConfigError(f"{prefix}.k2 ({self.k2}) must be smaller than {prefix}.k1 ({self.k1})")

    def _validate_k2(self, prefix: str) -> None:
        if isinstance(self.k2, str):
            if self.k2 != "auto":
                raise ConfigError(f"{prefix}.k2: a number, auto or null, got {self.k2!r}")
            return
        check_positive(f"{prefix}.k2", self.k2)

# faiss trains k-means on at most ``k * max_points_per_centroid`` points and
# silently subsamples the rest (its default, 256 per centroid, would train on
# 128,000 of 200,000 points at k=500). raysv sets the limit so every point is used up to
# this many in total (10 M x 256-d float32 = 10 GB); beyond it faiss subsamples
# to about this many, and every point is still assigned at the end.
MAX_KMEANS_TRAIN_POINTS = 10_000_000
METRICS = ("cosine", "euclidean")
KMEANS_METHODS = ("flat", "two_level", "auto")

_CHECK_BLOCK = 65_536


def _openblas_coretype() -> str | None:
    """The OpenBLAS kernel family this x86 CPU supports ("SkylakeX" for AVX-512, "Haswell" for AVX2), if known."""
    try:
        with open("/proc/cpuinfo") as f:
            flags: set[str] = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return None
    if {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def import_faiss() -> ModuleType:
    """Import faiss with its bundled OpenBLAS using this CPU's vector kernels.

    faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.15) that does not
    recognise recent CPUs such as Sapphire Rapids and falls back to generic SSE3
    ("Prescott") kernels, which made k-means 3-4x slower on this project's
    machines. ``OPENBLAS_CORETYPE`` names the kernels explicitly; OpenBLAS reads
    it when it loads, so it is set only around the first import of faiss, and
    only when the user has not set it.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    coretype = None if "OPENBLAS_CORETYPE" in os.environ else _openblas_coretype()
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        import faiss
    finally:
        if coretype:
            os.environ.pop("OPENBLAS_CORETYPE", None)
    return faiss


def _as_matrix(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Check ``x`` is a non-empty 2-D array of numbers."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (N, D), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{what} must have at least one row and one column, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{what} must hold numbers, got dtype {arr.dtype}")
    return arr


def _normalised_rows(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 copy with unit-norm rows; NaN/inf or all-zero rows are an error naming how many.

    Works block by block so the check costs no second full-size temporary.
    """
    arr = _as_matrix(x, what)
    n = arr.shape[0]
    out = np.empty(arr.shape, dtype=np.float32)
    bad_rows: list[np.ndarray] = []
    zero_rows: list[np.ndarray] = []
    for start in range(0, n, _CHECK_BLOCK):
        block = out[start : start + _CHECK_BLOCK]
        block[...] = arr[start : start + _CHECK_BLOCK]
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad_rows.append(np.flatnonzero(~finite) + start)
            block[~finite] = 1.0
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        zero = norms == 0
        if zero.any():
            zero_rows.append(np.flatnonzero(zero) + start)
            norms[zero] = 1.0
        block /= norms[:, None].astype(np.float32)
    if bad_rows:
        rows = np.concatenate(bad_rows)
        raise ValueError(
            f"{what} have {len(rows)} rows with NaN or inf values (of {n}); first rows: {rows[:10].tolist()}"
        )
    if zero_rows:
        rows = np.concatenate(zero_rows)
        raise ValueError(
            f"{what} have {len(rows)} all-zero rows (of {n}) that cannot be L2-normalised; "
            f"first rows: {rows[:10].tolist()}"
        )
    return out


def _resolve_gpu(use_gpu: bool | None) -> bool:
    """GPU k-means when faiss sees a GPU and ``use_gpu`` is not False.

    ``use_gpu=True`` without a faiss GPU (faiss-cpu installed on a GPU node, or no
    device visible) warns and runs on CPU: the pipeline's ``use_gpu`` follows the
    Ray cluster, and a clustering stage should not fail over the faiss wheel.
    """
    faiss = import_faiss()
    available = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is True and available == 0:
        log.warning(
            "use_gpu=True but faiss sees no GPU (faiss-cpu installed instead of faiss-gpu, or "
            "CUDA_VISIBLE_DEVICES empty); running k-means on CPU"
        )
    return available > 0 and use_gpu is not False


WARD_UTTERANCES_MAX = 50_000
"""``k1: null`` (Ward of the utterances themselves) up to this many utterances: fastcluster's exact
Ward takes O(N^2 D) time in one thread, 13 minutes for 50,000 x 256 (the README's Performance
section); beyond, k-means first (set k1)."""


def _check_k(k1: int | None, n: int) -> None:
    if k1 is None:
        if n > WARD_UTTERANCES_MAX:
            raise InputError(f"k1=null (Ward of the utterances themselves) takes time in the square of their number: "
                             f"{n} utterances is more than {WARD_UTTERANCES_MAX}; set k1 (k-means first), e.g. "
                             f"k1={max(2, n // 20)}")
        return
    if not isinstance(k1, (int, np.integer)) or isinstance(k1, bool):
        raise ValueError(f"k1 must be an integer, got {k1!r}")
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    if k1 > n:
        raise ValueError(f"k1={k1} is larger than the number of utterances ({n}); use k1 <= {n}")


TWO_LEVEL_ABOVE = 5_000_000_000
"""``kmeans: auto`` clusters in two levels when points × centroids passes this (one flat iteration of
1.09 M × 50,000 is 5.5e10 distances: minutes on a CPU)."""


IVF_PROBES = 8
"""Lists of the centroids' inverted file searched per point in two-level assignment (of √k1): at
200,000 × 256 → 5,000 it gives the same NMI as 16, and as exact search to 0.003."""


def kmeans_method(n: int, k: int, method: str) -> str:
    """``flat`` or ``two_level`` for ``method`` (``auto`` decides by the size of the problem)."""
    if method not in KMEANS_METHODS:
        raise ValueError(f"kmeans must be one of {', '.join(KMEANS_METHODS)}, got {method!r}")
    if method != "auto":
        return method
    return "two_level" if n * k > TWO_LEVEL_ABOVE and k >= 100 else "flat"


def kmeans(
    x: np.ndarray, k: int, niter: int = 20, seed: int = 0, use_gpu: bool | None = None, metric: str = "cosine",
    method: str = "flat",
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with faiss: ``(centroids (k, D) float32, assignment (N,) int64)``.

    ``cosine``: spherical k-means of the L2-normalised rows (unit-norm centroids, assignment by
    largest inner product). ``euclidean``: plain k-means of the rows as they are (the
    reference clusters raw embeddings so). ``flat`` trains all k centroids on every point (up
    to :data:`MAX_KMEANS_TRAIN_POINTS`) and assigns each point to its nearest; ``two_level``
    is faiss's hierarchical scheme (:func:`_two_level_centroids`: √k coarse clusters, each
    split in proportion to its size), with each point then assigned to its nearest final
    centroid through an inverted-file index of the centroids (:data:`IVF_PROBES` lists probed).
    """
    faiss = import_faiss()

    n = _as_matrix(x).shape[0]
    _check_k(k, n)
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    method = kmeans_method(n, k, method)
    gpu = _resolve_gpu(use_gpu)
    xn = _normalised_rows(x) if metric == "cosine" else _finite_rows(x)
    d = xn.shape[1]
    spherical = metric == "cosine"
    if method == "flat":
        km = faiss.Kmeans(d, int(k), niter=int(niter), spherical=spherical, seed=int(seed), gpu=gpu,
                          max_points_per_centroid=max(1, math.ceil(MAX_KMEANS_TRAIN_POINTS / int(k))),
                          min_points_per_centroid=1, verbose=False)
        km.train(xn)
        _, assignment = km.assign(xn)
        return np.ascontiguousarray(km.centroids, dtype=np.float32), assignment.astype(np.int64, copy=False)
    centroids = _two_level_centroids(faiss, xn, int(k), int(niter), int(seed), spherical, gpu)
    # Nearest centroid through an inverted file over the centroids (√k lists, 8 probed): on
    # clustered data an HNSW graph of the centroids leaves ~15 % of them nearest to no point.
    lists = max(1, int(round(math.sqrt(k))))
    metric_id = faiss.METRIC_INNER_PRODUCT if spherical else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, metric_id)
    index.cp.min_points_per_centroid = 1
    index.train(centroids)
    index.add(centroids)
    index.nprobe = min(lists, IVF_PROBES)
    _, assignment = index.search(xn, 1)
    return centroids, assignment[:, 0].astype(np.int64, copy=False)


def drop_empty(centroids: np.ndarray, assignment: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The centroids some point is nearest to, the assignment renumbered to them, and how many went:
    an empty centroid would make a Ward group of nobody, and fewer than k2 pseudo-speakers."""
    used = np.bincount(assignment, minlength=len(centroids)) > 0
    if used.all():
        return centroids, assignment, 0
    return centroids[used], (np.cumsum(used) - 1)[assignment], int((~used).sum())


def split_counts(sizes: np.ndarray, k: int) -> np.ndarray:
    """Centroids per coarse cluster: ``k`` in all, in proportion to ``sizes``, at least 1 and at most
    the cluster's size for each non-empty cluster (0 for empty ones)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = (sizes > 0).astype(np.int64)
    if not counts.sum() <= k <= sizes.sum():
        raise ValueError(f"cannot split {int(counts.sum())} coarse clusters of {int(sizes.sum())} points into {k}")
    while (left := k - int(counts.sum())) > 0:
        room = np.flatnonzero(sizes > counts)
        quota = left * sizes[room] / sizes[room].sum()
        add = np.minimum(np.floor(quota).astype(np.int64), sizes[room] - counts[room])
        if add.sum() > 0:
            counts[room] += add
        else:  # less than one each: one more to the clusters of the largest quotas
            counts[room[np.argsort(-quota, kind="stable")[:left]]] += 1
    return counts


def _two_level_centroids(faiss: ModuleType, x: np.ndarray, k: int, niter: int, seed: int, spherical: bool,
                         gpu: bool | int) -> np.ndarray:
    """faiss' two-level clustering (``faiss.contrib.clustering.two_level_clustering``, its settings)
    with :func:`split_counts` allocating the fine centroids: the library's proportional split
    gives a coarse cluster smaller than N / k no centroid at all, and faiss then fails."""
    d = x.shape[1]
    coarse = max(2, int(round(math.sqrt(k))))
    km = faiss.Kmeans(d, coarse, niter=niter, max_points_per_centroid=2000, min_points_per_centroid=1,
                      spherical=spherical, seed=seed, gpu=gpu, verbose=False)
    km.train(x)
    _, first = km.assign(x)
    sizes = np.bincount(first, minlength=coarse)
    counts = split_counts(sizes, k)
    order = np.argsort(first, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = []
    for c in np.flatnonzero(counts):
        subset = x[order[bounds[c] : bounds[c + 1]]]
        if counts[c] == len(subset):
            parts.append(subset)
            continue
        sub = faiss.Kmeans(d, int(counts[c]), niter=niter, min_points_per_centroid=1, spherical=spherical,
                           seed=seed, gpu=gpu, verbose=False)
        sub.train(subset)
        parts.append(sub.centroids)
    return np.vstack(parts)


def _finite_rows(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 copy; rows with NaN or inf are an error naming how many."""
    arr = np.ascontiguousarray(_as_matrix(x, what), dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{what} have {len(rows)} rows with NaN or inf values (of {len(arr)}); "
                         f"first rows: {rows[:10].tolist()}")
    return arr


def _cut_first_merges(z: np.ndarray, n: int, k: int) -> np.ndarray:
    """Flat clusters after the first ``n - k`` merges of linkage ``z``: exactly ``k`` groups, ties included."""
    parent = np.arange(2 * n - 1, dtype=np.int64)
    merges = n - k
    children = z[:merges, :2].astype(np.int64)
    new_nodes = np.arange(n, n + merges, dtype=np.int64)
    parent[children[:, 0]] = new_nodes
    parent[children[:, 1]] = new_nodes
    while True:
        nxt = parent[parent]
        if np.array_equal(nxt, parent):
            break
        parent = nxt
    return parent[:n]


def _first_appearance_codes(groups: np.ndarray) -> np.ndarray:
    """Renumber arbitrary group ids to 0..G-1 in order of first appearance."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def ward_linkage(centroids: np.ndarray) -> np.ndarray:
    """Exact Ward linkage of the centroids as points, by fastcluster's ``linkage_vector`` (O(k1 · D) memory)."""
    import fastcluster

    c = _as_matrix(centroids, "centroids").astype(np.float64)
    if not np.isfinite(c).all():
        bad = int((~np.isfinite(c).all(axis=1)).sum())
        raise ValueError(f"centroids have {bad} rows with NaN or inf values")
    return fastcluster.linkage_vector(c, method="ward")


def cut_linkage(z: np.ndarray, k2: int) -> np.ndarray:
    """Groups ``(n,)`` int64 in 0..k2-1 of the ``n`` leaves of linkage ``z`` cut into exactly ``k2``.

    scipy's ``fcluster(maxclust)``; when tied merge heights make it return fewer than
    ``k2`` groups, the tree is cut after its first ``n - k2`` merges instead. Groups are
    numbered by first appearance.
    """
    from scipy.cluster.hierarchy import fcluster

    n = z.shape[0] + 1
    if not isinstance(k2, (int, np.integer)) or isinstance(k2, bool):
        raise ValueError(f"k2 must be an integer, got {k2!r}")
    if not 1 <= k2 <= n:
        raise ValueError(f"k2 must be between 1 and the number of centroids ({n}), got {k2}")
    if k2 == n:
        return np.arange(n, dtype=np.int64)
    if k2 == 1:
        return np.zeros(n, dtype=np.int64)
    groups = fcluster(z, t=k2, criterion="maxclust")
    if len(np.unique(groups)) != k2:
        groups = _cut_first_merges(z, n, k2)
    return _first_appearance_codes(groups)


def ward_on_centroids(centroids: np.ndarray, k2: int) -> np.ndarray:
    """Ward clustering of the centroids as points into exactly ``k2`` groups: ``(k1,)`` int64 in 0..k2-1."""
    k1 = _as_matrix(centroids, "centroids").shape[0]
    if not isinstance(k2, (int, np.integer)) or isinstance(k2, bool):
        raise ValueError(f"k2 must be an integer, got {k2!r}")
    if not 1 <= k2 <= k1:
        raise ValueError(f"k2 must be between 1 and the number of centroids ({k1}), got {k2}")
    if k2 in (1, k1):
        return np.zeros(k1, dtype=np.int64) if k2 == 1 else np.arange(k1, dtype=np.int64)
    return cut_linkage(ward_linkage(centroids), k2)


SILHOUETTE_SAMPLE = 10_000
"""``k2: auto`` scores the Ward cuts on at most this many utterances (a random sample): the
silhouette needs their pairwise distances (10,000: 400 MB, about a second per cut)."""
SILHOUETTE_STEP = 1.08  # the cuts scored: k = 2, then about 8 % more groups each
COUNT_UTTERANCES_MIN = 4
"""The cuts scored leave this many utterances per group on average, at least: a cut into groups of
two or three near-duplicate utterances has a high silhouette that counts no speakers (with ``k1:
null`` the Ward cuts of 1,200 utterances peak at 240-470 groups of 80 speakers)."""


def silhouette_curve(
    x: np.ndarray, z: np.ndarray, assignment: np.ndarray, metric: str = "cosine", seed: int = 0,
    sample: int = SILHOUETTE_SAMPLE,
) -> list[tuple[int, float]]:
    """Mean silhouette of the utterances for Ward cuts of the centroids' linkage ``z`` into k groups.

    k runs geometrically from 2 to the number of centroids, so that the curve falls past a
    count that is a large share of them, but no further than :data:`COUNT_UTTERANCES_MIN`
    utterances per group on average. The silhouette compares each
    utterance's mean distance to its own group with that to the nearest other group
    (Rousseeuw 1987), on ``sample`` utterances drawn once for every cut.
    """
    from sklearn.metrics import silhouette_score

    n_centroids = z.shape[0] + 1
    arr = _as_matrix(x)
    ks = np.unique(np.round(2 * SILHOUETTE_STEP ** np.arange(400)).astype(np.int64))
    ks = ks[ks <= min(n_centroids, len(arr) // COUNT_UTTERANCES_MIN)]
    rows = np.random.default_rng(seed).permutation(len(arr))[:sample]
    p = _normalised_rows(arr[rows]) if metric == "cosine" else arr[rows].astype(np.float32)
    if metric == "cosine":
        dist = np.clip(1.0 - p @ p.T, 0.0, None)
    else:
        sq = (p * p).sum(1)
        dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * p @ p.T, 0.0, None))
    np.fill_diagonal(dist, 0.0)
    curve = []
    for k in ks:
        groups = cut_linkage(z, k)[assignment[rows]]
        if len(np.unique(groups)) < 2:
            continue
        curve.append((int(k), float(silhouette_score(dist, groups, metric="precomputed"))))
    return curve


SPEAKERS_MIN = 10
"""``k2: auto`` counts ten speakers or more. Below that the silhouette often peaks at a handful of
coarse groups that are not speakers (2-6 on the toy corpora's embeddings: sexes, channels)."""
PEAK_PROMINENCE = 0.05
"""A count is a peak of the silhouette curve that stands out: its silhouette at least this much above
the lowest on each side of it. On round-1 and round-2 embeddings the formant voices' speakers stand out
by 0.06-0.25; on the tube voices, whose embeddings hold no speaker count, the best cuts stand out by
0.01-0.06 (2 of 9 curves pass, at 59 and 101 groups of 80 speakers; docs/toy-corpora.md)."""


def estimate_clusters(
    curve: list[tuple[int, float]], min_k: int = SPEAKERS_MIN, prominence: float = PEAK_PROMINENCE
) -> int | None:
    """The k of best mean silhouette among the cuts into ``min_k`` groups or more, or None where it
    shows no count.

    No count: the best lies at either end of that range (the silhouette keeps rising past it), or it
    stands less than ``prominence`` above the lowest silhouette on either side of it (a bump in a flat
    curve). A number there would be a guess; the caller falls back to ``k2_fallback``.
    """
    scored = [(k, v) for k, v in curve if k >= min_k]
    if len(scored) < 3:
        return None
    best = max(range(len(scored)), key=lambda i: scored[i][1])
    if best in (0, len(scored) - 1):
        return None
    value = scored[best][1]
    stands_out = min(value - min(v for _, v in scored[:best]), value - min(v for _, v in scored[best + 1:]))
    return int(scored[best][0]) if stands_out >= prominence else None


def confident_rows(x: np.ndarray, groups: np.ndarray, keep: float, metric: str = "cosine") -> np.ndarray:
    """The ``keep`` fraction of rows whose group is clearest, as a boolean mask.

    A row's margin is its similarity to its own group's mean minus that to the nearest other
    group's mean (cosine, or negative squared distance for ``euclidean``); the rows with the
    largest margins are kept. Rows on the border of two groups are the ones most often given
    the wrong speaker, and a round trains better on fewer, cleaner labels: on the DINO
    embeddings of the toy corpora, keeping half raised the purity of 120 groups from 0.39 to
    0.56 (tube voices) and from 0.76 to 0.88 (formant voices).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    ids, inverse = np.unique(groups, return_inverse=True)
    n = len(inverse)
    if len(ids) < 2 or keep == 1.0:
        return np.ones(n, dtype=bool)
    pts = _normalised_rows(x) if metric == "cosine" else _as_matrix(x).astype(np.float32)
    means = np.zeros((len(ids), pts.shape[1]), dtype=np.float64)
    np.add.at(means, inverse, pts)
    means = (means / np.bincount(inverse)[:, None]).astype(np.float32)
    # cosine: similarity to the unit mean; euclidean: -|x - m|^2 up to the row's own |x|^2
    if metric == "cosine":
        means, offset = _normalised_rows(means, "group means"), np.zeros(len(ids), dtype=np.float32)
    else:
        means, offset = 2 * means, -(means * means).sum(1)
    margin = np.empty(n, dtype=np.float32)
    for start in range(0, n, _CHECK_BLOCK):  # (rows x groups) similarities a block at a time
        sim = pts[start:start + _CHECK_BLOCK] @ means.T + offset
        rows, own = np.arange(len(sim)), inverse[start:start + _CHECK_BLOCK]
        mine = sim[rows, own].copy()
        sim[rows, own] = -np.inf
        margin[start:start + len(sim)] = mine - sim.max(axis=1)
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(-margin, kind="stable")[: max(1, int(round(keep * n)))]] = True
    return mask


def _finalise(raw: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """Drop groups below ``min_cluster_size`` and rows already -1, and renumber the rest densely:
    largest first, ties by first row."""
    groups, first, inverse, counts = np.unique(raw, return_index=True, return_inverse=True, return_counts=True)
    keep = (counts >= min_cluster_size) & (groups >= 0)
    order = np.lexsort((first, -counts))
    order = order[keep[order]]
    mapping = np.full(len(groups), -1, dtype=np.int32)
    mapping[order] = np.arange(len(order), dtype=np.int32)
    return mapping[inverse.reshape(-1)]


def check_settings(n: int, k1: int | None, k2: int | str | None, min_cluster_size: int, niter: int,
                   k2_fallback: int | None = None) -> None:
    """Cheap checks of the clustering settings against ``n`` utterances, before any work."""
    if k1 is None and k2 is None:
        raise InputError("k1=None and k2=None: every utterance would be its own class; set k2 (a number or auto)")
    _check_k(k1, n)
    if k2 == "auto":  # the number is found later; only k2_fallback is checked here
        k2 = None
    for name, value in (("k2", k2), ("k2_fallback", k2_fallback)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
            raise ValueError(f"{name} must be an integer or None, got {value!r}")
    if k1 is None:  # Ward of the utterances: the groups to merge are the n utterances
        groups, merged = n, f"with k1=null Ward merges the {n} utterances themselves"
    else:
        groups, merged = k1, f"Ward merges the k1={k1} k-means centroids"
    for name, value in (("k2", k2), ("k2_fallback", k2_fallback)):
        if value is not None and not 1 <= value < groups:
            raise InputError(f"{name}={value}: {merged}; {name} must be between 1 and {groups} (excluded)"
                             + (" or None to keep the k-means clusters" if name == "k2" and k1 is not None else ""))
    if min_cluster_size < 0:
        raise ValueError(f"min_cluster_size must be >= 0, got {min_cluster_size}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")


def estimate_note(info: dict[str, Any]) -> str:
    """What ``k2: auto`` found, for a log line; empty for a fixed k2."""
    if "k2_estimate" not in info:
        return ""
    if info["k2_estimate"] is None:
        return ", no speaker count in the silhouette: k2_fallback"
    return f", {info['k2_estimate']} speakers estimated × {info['k2_factor']:g}"


def _first_level(
    arr: np.ndarray, k1: int | None, niter: int, seed: int, use_gpu: bool | None, metric: str, method: str
) -> tuple[str, np.ndarray, np.ndarray, int]:
    """The points Ward merges: k-means centroids (empty ones dropped), or the rows themselves for ``k1=None``.

    Returns the k-means method used ("none" without k-means), the points, each row's point and how many
    centroids came out empty.
    """
    if k1 is None:
        rows = _normalised_rows(arr) if metric == "cosine" else _finite_rows(arr)
        return "none", rows, np.arange(len(arr), dtype=np.int64), 0
    method = kmeans_method(arr.shape[0], k1, method)
    centroids, assignment = kmeans(arr, k1, niter=niter, seed=seed, use_gpu=use_gpu, metric=metric, method=method)
    centroids, assignment, empty = drop_empty(centroids, assignment)
    return method, centroids, assignment, empty


def _cut(points: np.ndarray, assignment: np.ndarray, k2: int, k1: int | None) -> np.ndarray:
    """Each row's group of the Ward cut of ``points`` into ``k2``."""
    if k2 >= len(points):
        raise ValueError(f"k2={k2}: only {len(points)} of the k1={k1} k-means clusters hold utterances; "
                         "lower k2 or raise k1")
    return cut_linkage(ward_linkage(points), k2)[assignment]


def pseudo_labels(
    embeddings: np.ndarray,
    k1: int | None,
    k2: int | str | None = None,
    min_cluster_size: int = 0,
    niter: int = 20,
    seed: int = 0,
    use_gpu: bool | None = None,
    metric: str = "cosine",
    k2_factor: float = 1.0,
    method: str = "flat",
    keep: float = 1.0,
    k2_fallback: int | None = None,
    lda: LdaConfig | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Pseudo-labels (N,) int32 for the rows of ``embeddings``, and how they were made.

    k-means into k1, then Ward of the centroids into k2; every utterance takes its
    centroid's group (k2=None keeps the k-means clusters). ``k1=None``: no k-means, Ward of
    the utterances themselves (unit rows for ``cosine``), :data:`WARD_UTTERANCES_MAX` at most. ``k2="auto"``: the number of
    groups is the Ward cut of best silhouette (:func:`estimate_clusters`) times ``k2_factor``
    (over-clustering), or ``k2_fallback`` where the silhouette shows no count. ``keep`` < 1
    labels only that fraction of the utterances, those whose group is clearest
    (:func:`confident_rows`); the others become -1. ``lda`` with iterations: that many passes
    of LDA on the labels and the same clustering, with the same number of groups, in its space
    (:mod:`raysv.pseudo.lda`).
    Clusters with fewer than ``min_cluster_size`` utterances become -1; the rest are numbered
    0..C-1, largest first, ties by first row.
    """
    arr = _as_matrix(embeddings)
    check_settings(arr.shape[0], k1, k2, min_cluster_size, niter, k2_fallback)
    t0 = time.perf_counter()
    method, centroids, assignment, empty = _first_level(arr, k1, niter, seed, use_gpu, metric, method)
    t1 = time.perf_counter()
    info: dict[str, Any] = {"kmeans": method, "kmeans_seconds": round(t1 - t0, 3)}
    if empty:
        info["empty_centroids"] = empty
    if k2 is None:
        raw = assignment
    elif k2 != "auto":
        info["k2_used"] = int(k2)
        raw = _cut(centroids, assignment, int(k2), k1)
    else:
        z = ward_linkage(centroids)
        curve = silhouette_curve(arr, z, assignment, metric, seed)
        estimate = estimate_clusters(curve)
        if estimate is None and k2_fallback is None:
            raise InputError(
                f"k2=auto: the silhouette of the Ward cuts into {SPEAKERS_MIN}..{curve[-1][0] if curve else 2} groups "
                f"({len(centroids)} {'utterances' if k1 is None else 'centroids'}) has no peak that stands out: these embeddings show no count of "
                "speakers; set k2 to a number or give k2_fallback (cluster.k2_fallback, raysv cluster --k2-fallback)")
        k2 = k2_fallback if estimate is None else int(min(max(round(k2_factor * estimate), 2), len(centroids) - 1))
        info.update({"k2_estimate": estimate, "k2_factor": float(k2_factor),
                     "silhouette": [[k, round(v, 4)] for k, v in curve]})
        info["k2_used"] = int(k2)
        raw = cut_linkage(z, int(k2))[assignment]
    space = arr
    if lda is not None and lda.iterations:
        def regroup(rows: np.ndarray) -> np.ndarray:
            _, again, assigned, _ = _first_level(rows, k1, niter, seed, use_gpu, metric, method)
            return assigned if k2 is None else _cut(again, assigned, int(k2), k1)

        raw, space, made = refine_labels(arr, raw, lda, regroup)
        info.update(made)
    if keep < 1.0:
        raw = np.where(confident_rows(space, raw, keep, metric), raw, -1)
    labels = _finalise(raw, min_cluster_size)
    info["ward_seconds"] = round(time.perf_counter() - t1, 3)
    log.info(
        "clustered %d x %d embeddings: %s k-means k1=%s in %.1fs, Ward k2=%s%s in %.1fs",
        arr.shape[0], arr.shape[1], metric, k1, t1 - t0, info.get("k2_used"),
        estimate_note(info), info["ward_seconds"],
    )
    return labels, info


def cluster_embeddings(
    embeddings: np.ndarray,
    k1: int | None,
    k2: int | str | None = None,
    min_cluster_size: int = 0,
    niter: int = 20,
    seed: int = 0,
    use_gpu: bool | None = None,
    metric: str = "cosine",
    method: str = "flat",
) -> np.ndarray:
    """The labels of :func:`pseudo_labels` alone."""
    return pseudo_labels(embeddings, k1, k2, min_cluster_size, niter, seed, use_gpu, metric, method=method)[0]
