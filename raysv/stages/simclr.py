"""The end-to-end contrastive baseline: the round model trained on crops of one utterance, no labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raysv.config import to_dict
from raysv.artifacts.shards import check_shards
from raysv.data.pipelines import check_augment, multi_crop_dataset
from raysv.run_config import Config
from raysv.runtime import ensure_ray
from raysv.stages.base import (
    StageContext,
    StageKind,
    StageResult,
    data_slice,
    pretrained_backbone,
    shard_count,
    standalone_run_name,
    steps_per_epoch,
    train_settings,
)
from raysv.train.trainer import fit

log = logging.getLogger("raysv")


def train_simclr(
    cfg: Config,
    out: str | Path,
    *,
    init: str | Path | None = None,
    run_name: str | None = None,
    mlflow: dict | None = None,
    **kw,
) -> Path:
    """(AM-)NT-Xent on ``simclr.views`` crops per utterance of the round model (``finetune.model``)."""
    check_augment(cfg.data.augment)
    check_shards(cfg.data.shards)
    ensure_ray(cfg.ray)
    s = cfg.simclr
    rows = shard_count(cfg.data.shards)
    steps = steps_per_epoch(rows, s.batch_size, cfg.ray.num_workers, cfg.train.max_steps_per_epoch)
    dataset = multi_crop_dataset(cfg.data, {"views": (s.views, s.crop_seconds)})
    args = {
        "steps_per_epoch": steps,
        "model": to_dict(cfg.finetune.model),
        "pretrained": pretrained_backbone(cfg),
        "init": str(Path(init).resolve()) if init else None,
    }
    settings = train_settings(cfg, run_name or standalone_run_name(cfg, "simclr", out), out)
    log.info("SimCLR: %d utterances, %d views of %.1f s, %d steps/epoch", rows, s.views, s.crop_seconds, steps)
    return fit("simclr", s, dataset, out, settings, method_args=args, mlflow=mlflow,
               fingerprint={**SimclrStage().config_slice(cfg), "init": args["init"]},
               fingerprint_default=SimclrStage().config_slice(Config()), **kw)


class SimclrStage(StageKind):
    name = "simclr"
    trains = True

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"seed": cfg.seed, "data": data_slice(cfg), "simclr": to_dict(cfg.simclr),
                "model": to_dict(cfg.finetune.model)}

    def run(self, ctx: StageContext) -> StageResult:
        train_simclr(ctx.cfg, ctx.layout.model(ctx.stage.id), run_name=ctx.train_name, mlflow=ctx.mlflow,
                     fault=ctx.fault)
        return StageResult()
