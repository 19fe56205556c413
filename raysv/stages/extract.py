"""Embeddings of every training utterance with a round's model, for the next clustering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raysv.artifacts.shards import check_shards
from raysv.embedding.pool import extract_embeddings
from raysv.run_config import Config
from raysv.runtime import ensure_ray, use_gpu
from raysv.stages.base import StageContext, StageKind, StageResult


def extract(cfg: Config, checkpoint: str | Path, out: str | Path, shards: str | Path | None = None,
            utt_indices: np.ndarray | None = None) -> dict:
    """``out/embeddings.parquet``: every utterance of the shards (or those ``utt_indices``) embedded with the checkpoint."""
    check_shards(shards or cfg.data.shards)
    ensure_ray(cfg.ray)
    return extract_embeddings(
        checkpoint,
        shards or cfg.data.shards,
        out,
        max_seconds=cfg.extract.max_seconds,
        batch_size=cfg.extract.batch_size,
        num_actors=cfg.extract.num_actors,
        use_gpu=use_gpu(cfg.ray.use_gpu),
        normalize=cfg.extract.normalize,
        utt_indices=utt_indices,
    )


class ExtractStage(StageKind):
    name = "extract"

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"shards": cfg.data.shards, "max_seconds": cfg.extract.max_seconds, "normalize": cfg.extract.normalize}

    def run(self, ctx: StageContext) -> StageResult:
        return StageResult(metrics=extract(ctx.cfg, ctx.layout.model(ctx.stage.model), ctx.folder))
