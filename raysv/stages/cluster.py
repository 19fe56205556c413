"""Pseudo-labels for the next round: k-means then Ward clustering of a round's embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raysv.config import to_dict
from raysv.pseudo.remote import CLUSTERS_FILE, run_clustering
from raysv.run_config import Config
from raysv.runtime import ensure_ray, use_gpu
from raysv.stages.base import StageContext, StageKind, StageResult


def cluster(cfg: Config, embeddings: str | Path, out: str | Path, previous: str | Path | None = None) -> dict:
    """``out/labels.parquet`` and ``out/clusters.json`` from an embeddings file (or the folder holding it).

    ``previous``: the labels the embedding model was trained on; their agreement with the new
    labels goes into ``clusters.json``.
    """
    ensure_ray(cfg.ray)
    manifest = Path(cfg.data.shards) / "manifest.parquet"
    c = cfg.cluster
    return run_clustering(
        Path(embeddings) / "embeddings.parquet" if Path(embeddings).is_dir() else embeddings,
        out,
        k1=c.k1,
        k2=c.k2,
        min_cluster_size=c.min_cluster_size,
        niter=c.niter,
        seed=c.seed,
        manifest=manifest if manifest.is_file() else None,
        use_gpu=use_gpu(cfg.ray.use_gpu),
        metric=c.metric,
        k2_factor=c.k2_factor,
        method=c.kmeans,
        keep=c.keep,
        previous=previous,
        k2_fallback=c.k2_fallback,
        lda=c.lda,
    )


class ClusterStage(StageKind):
    """Labels for round r + 1 from round r's embeddings, with round r + 1's clustering settings."""

    name = "cluster"

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"cluster": to_dict(cfg.cluster)}

    def run(self, ctx: StageContext) -> StageResult:
        r = ctx.stage.round
        previous = ctx.layout.labels(r - 1) if r > 0 else None  # the labels round r's model trained on
        metrics = cluster(ctx.cfg, ctx.layout.embeddings(r), ctx.folder,
                          previous if previous is not None and previous.is_file() else None)
        return StageResult(metrics=metrics, artifacts=[ctx.folder / CLUSTERS_FILE])

    def summarise(self, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        row["nmi"] = metrics.get("nmi")
        if "previous_nmi" in metrics:
            row["nmi_previous"] = metrics["previous_nmi"]
        row["num_clusters"] = metrics.get("num_clusters")
        if "k2_estimate" in metrics:
            row["speakers_estimated"] = metrics["k2_estimate"]
