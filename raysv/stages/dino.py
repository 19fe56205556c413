"""Round 0: DINO self-distillation of an ECAPA-TDNN on the shards, no labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raysv.config import to_dict
from raysv.artifacts.shards import check_shards
from raysv.data.pipelines import check_augment, multi_crop_dataset
from raysv.methods.dino import dino_views
from raysv.run_config import Config
from raysv.runtime import ensure_ray
from raysv.stages.base import (
    StageContext,
    StageKind,
    StageResult,
    data_slice,
    shard_count,
    standalone_run_name,
    steps_per_epoch,
    train_settings,
)
from raysv.train.trainer import fit

log = logging.getLogger("raysv")


def train_dino(cfg: Config, out: str | Path, *, run_name: str | None = None, mlflow: dict | None = None, **kw) -> Path:
    """DINO on ECAPA-TDNN from the shards; the teacher backbone is saved in ``out``."""
    check_augment(cfg.data.augment)  # bad input is named before a cluster is started or joined
    check_shards(cfg.data.shards)
    ensure_ray(cfg.ray)
    rows = shard_count(cfg.data.shards)
    steps = steps_per_epoch(rows, cfg.dino.batch_size, cfg.ray.num_workers, cfg.train.max_steps_per_epoch)
    dataset = multi_crop_dataset(cfg.data, dino_views(cfg.dino.crops))
    settings = train_settings(cfg, run_name or standalone_run_name(cfg, "dino", out), out)
    log.info("DINO: %d utterances, %d steps/epoch, %d epochs", rows, steps, cfg.dino.epochs)
    return fit("dino", cfg.dino, dataset, out, settings, method_args={"steps_per_epoch": steps}, mlflow=mlflow,
               fingerprint=DinoStage().config_slice(cfg), fingerprint_default=DinoStage().config_slice(Config()), **kw)


class DinoStage(StageKind):
    name = "dino"
    trains = True

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"seed": cfg.seed, "data": data_slice(cfg), "dino": to_dict(cfg.dino)}

    def run(self, ctx: StageContext) -> StageResult:
        train_dino(ctx.cfg, ctx.layout.model(ctx.stage.id), run_name=ctx.train_name, mlflow=ctx.mlflow, fault=ctx.fault)
        return StageResult()
