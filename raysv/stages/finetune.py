"""Rounds >= 1: the round model fine-tuned on pseudo-labels; and the last, large-margin fine-tune."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from raysv.artifacts.checkpoint import blend_with_start, load_training_state
from raysv.artifacts.labels import read_labels, speaker_labels, write_labels
from raysv.artifacts.shards import check_shards, read_manifest
from raysv.config import to_dict
from raysv.data.pipelines import check_augment, label_table, supervised_dataset
from raysv.run_config import Config
from raysv.runtime import ensure_ray
from raysv.stages.base import (
    StageContext,
    StageKind,
    StageResult,
    data_slice,
    pretrained_backbone,
    standalone_run_name,
    steps_per_epoch,
    train_settings,
)
from raysv.train.trainer import fit

log = logging.getLogger("raysv")


def finetune(
    cfg: Config,
    labels: str | Path,
    out: str | Path,
    *,
    init: str | Path | None = None,
    large_margin: bool = False,
    run_name: str | None = None,
    mlflow: dict | None = None,
    **kw,
) -> Path:
    """The round model fine-tuned with AAM-softmax on ``labels`` (the ``lmft`` settings with ``large_margin``).

    The labels it ends with (after label correction) are written beside the model
    as ``labels.parquet``. With ``large_margin`` and ``lmft.start_weight``, the model kept
    blends the stage's end with ``init`` (:func:`blend_with_start`).
    """
    check_augment(cfg.data.augment)
    check_shards(cfg.data.shards)
    ensure_ray(cfg.ray)
    m = cfg.finetune.model
    if large_margin and cfg.lmft.start_weight > 0 and init is None:
        raise ValueError("lmft.start_weight blends the model kept with the one the stage starts from: give that (--init)")
    if init is None and m.kind == "ecapa" and m.ecapa_init == "dino":
        raise ValueError("finetune.model.ecapa_init is 'dino': give the DINO checkpoint as the init model")
    section = cfg.lmft.finetune_section(cfg.finetune) if large_margin else cfg.finetune
    utt_index, values = read_labels(labels)
    table = label_table(utt_index, values)
    rows = int((values >= 0).sum())
    steps = steps_per_epoch(rows, section.batch_size, cfg.ray.num_workers, cfg.train.max_steps_per_epoch)
    dataset = supervised_dataset(cfg.data, table, section.crop_seconds, with_clean=section.label_correction.enabled)
    pretrained = pretrained_backbone(cfg)
    args = {
        "steps_per_epoch": steps,
        "labels": str(Path(labels).resolve()),
        "init": str(Path(init).resolve()) if init else None,
        "init_classifier": large_margin,
        "pretrained": pretrained,
        "anchor": l2sp_anchor(cfg, pretrained),
    }
    kind = "lmft" if large_margin else "finetune"
    settings = train_settings(cfg, run_name or standalone_run_name(cfg, kind, out), out)
    log.info("fine-tune: %d labelled utterances, %d classes, %d steps/epoch", rows, int(values.max()) + 1, steps)
    fingerprint = {**_config_fingerprint(cfg, large_margin),
                   **{k: args[k] for k in ("labels", "init", "init_classifier", "pretrained", "anchor")}}
    out = fit("supervised", section, dataset, out, settings, method_args=args, mlflow=mlflow,
              fingerprint=fingerprint, fingerprint_default=_config_fingerprint(Config(), large_margin), **kw)
    if large_margin and cfg.lmft.start_weight > 0:
        blend_with_start(out, init, cfg.lmft.start_weight)
        log.info("large margin: the model kept is %.2f x its end + %.2f x %s", 1 - cfg.lmft.start_weight,
                 cfg.lmft.start_weight, init)
    final = load_training_state(out)["method"]["labels"].numpy()
    kept = final >= 0
    write_labels(out, np.nonzero(kept)[0], final[kept].astype(np.int32))
    return out


def l2sp_anchor(cfg: Config, pretrained: str | None) -> str | None:
    """The weights L2-SP pulls towards (``finetune.l2sp_anchor: pretrained``): the pre-trained WavLM, or the DINO encoder.

    None: the stage's own starting weights.
    """
    if cfg.finetune.l2sp_anchor != "pretrained":
        return None
    m = cfg.finetune.model
    if m.kind == "wavlm_mhfa":
        return pretrained
    dino = cfg.layout.model("round_0/dino")
    return str(dino.resolve()) if m.ecapa_init == "dino" and dino.is_dir() else None


def finetune_init(rcfg: Config, round_index: int) -> Path | None:
    """The checkpoint round ``round_index`` fine-tunes from; None: the pre-trained WavLM (or a fresh ECAPA).

    ``rcfg`` is the round's config (``round_config``). ``finetune.init: previous`` continues
    from the previous round's model (from round 2 on); otherwise every round restarts from
    the round model's initial weights, which for an ECAPA with ``ecapa_init: dino`` is the
    DINO encoder. Sweeps start their trials from the same checkpoint.
    """
    if rcfg.finetune.init == "previous" and round_index > 1:
        return rcfg.layout.model(f"round_{round_index - 1}/finetune")
    if rcfg.finetune.model.kind == "ecapa" and rcfg.finetune.model.ecapa_init == "dino":
        return rcfg.layout.model("round_0/dino")
    return None


def _config_fingerprint(cfg: Config, large_margin: bool) -> dict[str, Any]:
    """The config settings a fine-tune's result depends on (its inputs' paths are added beside them)."""
    section = cfg.lmft.finetune_section(cfg.finetune) if large_margin else cfg.finetune
    return {"seed": cfg.seed, "data": data_slice(cfg), "finetune": to_dict(section)}


class FinetuneStage(StageKind):
    name = "finetune"
    trains = True

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"seed": cfg.seed, "data": data_slice(cfg), "finetune": to_dict(cfg.finetune)}

    def run(self, ctx: StageContext) -> StageResult:
        r = ctx.stage.round
        finetune(ctx.cfg, ctx.layout.labels(r - 1), ctx.layout.model(ctx.stage.id), init=finetune_init(ctx.cfg, r),
                 run_name=ctx.train_name, mlflow=ctx.mlflow, fault=ctx.fault)
        return StageResult()


class LmftStage(StageKind):
    """The large-margin fine-tune of the model of stage ``source``, on the labels it trained on."""

    name = "lmft"
    trains = True

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"seed": cfg.seed, "data": data_slice(cfg), "finetune": to_dict(cfg.finetune), "lmft": to_dict(cfg.lmft)}

    def run(self, ctx: StageContext) -> StageResult:
        source = ctx.layout.model(ctx.stage.source or f"round_{ctx.stage.round}/finetune")
        finetune(ctx.cfg, source / "labels.parquet", ctx.layout.model(ctx.stage.id), init=source, large_margin=True,
                 run_name=ctx.train_name, mlflow=ctx.mlflow, fault=ctx.fault)
        return StageResult()


def supervised_settings(cfg: Config) -> Config:
    """The supervised reference's settings: the last round's, on true labels, gate and correction off
    (they would "correct" right labels), and ``reference.epochs`` when set."""
    f = cfg.finetune
    epochs = cfg.reference.epochs or f.epochs
    f = dataclasses.replace(
        f,
        epochs=epochs,
        loss_gate=dataclasses.replace(f.loss_gate, enabled=False),
        label_correction=dataclasses.replace(f.label_correction, enabled=False),
    )
    return dataclasses.replace(cfg, finetune=f)


class SupervisedStage(FinetuneStage):
    """The round model trained on the true speakers of the shards, started as round 1 starts."""

    name = "supervised"

    def settings(self, cfg: Config) -> Config:
        return supervised_settings(cfg)

    def run(self, ctx: StageContext) -> StageResult:
        labels = ctx.folder / "true_labels"
        utt, values, names = speaker_labels(read_manifest(ctx.cfg.data.shards, ["utt_index", "speaker"]))
        write_labels(labels, utt, values)
        log.info("supervised reference: %d utterances of %d speakers", len(utt), len(names))
        finetune(ctx.cfg, labels / "labels.parquet", ctx.layout.model(ctx.stage.id), init=finetune_init(ctx.cfg, 1),
                 run_name=ctx.train_name, mlflow=ctx.mlflow, fault=ctx.fault)
        return StageResult()


class SupervisedLmftStage(LmftStage):
    """The large-margin stage of the supervised reference, gate and correction off too."""

    name = "supervised_lmft"

    def settings(self, cfg: Config) -> Config:
        return supervised_settings(cfg)
