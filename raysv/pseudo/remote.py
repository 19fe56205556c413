"""The clustering stage's work: embeddings file → ``labels.parquet`` + ``clusters.json``, in a Ray actor.

The actor gets a GPU when the cluster has one (faiss-gpu then runs k-means there) and
all of its node's cores for faiss otherwise.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from raysv.artifacts.embeddings import read_embeddings
from raysv.artifacts.jsonio import write_json
from raysv.artifacts.labels import read_labels, write_labels
from raysv.errors import InputError
from raysv.pseudo.cluster import check_settings, estimate_note, import_faiss, pseudo_labels
from raysv.pseudo.lda import LdaConfig
from raysv.pseudo.diagnostics import cluster_diagnostics, label_agreement, manifest_speakers_of
from raysv.runtime import cluster_gpus, ensure_ray

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.json"


class _Clusterer:
    """Ray actor body: clusters on whatever device Ray gave it, with all the node's cores for faiss."""

    def cluster(
        self,
        embeddings: np.ndarray,
        k1: int | None,
        k2: int | str | None,
        min_cluster_size: int,
        niter: int,
        seed: int,
        use_gpu: bool | None,
        metric: str,
        k2_factor: float,
        method: str,
        keep: float,
        k2_fallback: int | None,
        lda: LdaConfig | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        faiss = import_faiss()

        # Ray sets OMP_NUM_THREADS to the actor's 1 logical CPU; the clustering
        # stage runs alone, so faiss may use every core of the node.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        faiss.omp_set_num_threads(max(1, cores))
        return pseudo_labels(embeddings, k1, k2, min_cluster_size, niter, seed, use_gpu, metric, k2_factor, method, keep,
                             k2_fallback, lda)


def run_clustering(
    embeddings: str | Path,
    out: str | Path,
    k1: int | None,
    k2: int | str | None = None,
    min_cluster_size: int = 0,
    niter: int = 20,
    seed: int = 0,
    manifest: str | Path | None = None,
    use_gpu: bool | None = None,
    metric: str = "cosine",
    k2_factor: float = 1.0,
    method: str = "flat",
    keep: float = 1.0,
    previous: str | Path | None = None,
    k2_fallback: int | None = None,
    lda: LdaConfig | None = None,
) -> dict[str, Any]:
    """The clustering stage: embeddings -> ``out/labels.parquet`` + ``out/clusters.json`` (written last, the marker).

    The clustering itself runs in a Ray actor (a GPU one when the cluster has
    GPUs and ``use_gpu`` is not False); ``lda``: passes of LDA and clustering again
    (:mod:`raysv.pseudo.lda`). With ``previous`` (a labels file) the agreement of the
    new labels with those goes beside the speaker figures (:func:`label_agreement`).
    Returns the contents of ``clusters.json``.
    """
    import ray

    t0 = time.perf_counter()
    out = Path(out)
    marker = out / CLUSTERS_FILE
    if marker.exists():
        marker.unlink()
    utt_index, x = read_embeddings(embeddings)
    check_settings(len(utt_index), k1, k2, min_cluster_size, niter, k2_fallback)
    if lda is not None:
        lda.validate()
    speakers = manifest_speakers_of(manifest, utt_index) if manifest is not None else None

    ensure_ray()
    ray_gpus = cluster_gpus() > 0
    if use_gpu is True and not ray_gpus:
        log.warning("use_gpu=True but the Ray cluster has no GPU; clustering on CPU")
    on_gpu = ray_gpus and use_gpu is not False and k1 is not None  # Ward runs on the CPU: only k-means uses a GPU
    # The clustering is deterministic: an actor lost mid-way (its node gone) is restarted and the call retried.
    actor = ray.remote(_Clusterer).options(num_cpus=1, num_gpus=1 if on_gpu else 0, max_restarts=2,
                                           max_task_retries=2).remote()
    try:
        labels, made = ray.get(
            actor.cluster.remote(
                ray.put(x), k1, k2, min_cluster_size, niter, seed, use_gpu if on_gpu else False, metric, k2_factor,
                method, keep, k2_fallback, lda,
            )
        )
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):  # the embeddings and settings, not the actor: say so in one line
            raise err.cause from None
        raise
    finally:
        ray.kill(actor)

    write_labels(out, utt_index, labels)
    info: dict[str, Any] = {
        "k1": None if k1 is None else int(k1),
        "k2": k2 if k2 in (None, "auto") else int(k2),
        "min_cluster_size": int(min_cluster_size),
        "niter": int(niter),
        "seed": int(seed),
        "metric": metric,
        "keep": float(keep),
        "lda": asdict(lda) if lda is not None and lda.iterations else None,
        "dim": int(x.shape[1]),
        "gpu": bool(on_gpu),
        "embeddings": str(embeddings),
        "manifest": None if manifest is None else str(manifest),
    }
    info.update(made)
    info.update(cluster_diagnostics(labels, speakers))
    if previous is not None:
        info.update(label_agreement(utt_index, labels, *read_labels(previous)))
    info["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(marker, info)
    log.info(
        "clustering: %d utterances -> %d clusters (k1=%s, k2=%s%s), %d dropped%s, %.1fs",
        info["num_utterances"], info["num_clusters"], k1, info.get("k2_used"),
        estimate_note(info), info["dropped"],
        f", NMI {info['nmi']:.3f} ARI {info['ari']:.3f} purity {info['purity']:.3f}" if "nmi" in info else "",
        info["seconds"],
    )
    if "previous_nmi" in info:
        log.info("  against the previous labels: NMI %.3f, ARI %.3f (%d utterances)", info["previous_nmi"],
                 info["previous_ari"], info["previous_utterances"])
    return info
