"""What every stage kind provides to the pipeline, and the helpers the training stages share.

A stage kind says, in one place, which slice of the config invalidates its output
(``config_slice``), how it runs (``run``) and what it adds to the results table
(``summarise``). The pipeline looks kinds up in ``raysv.stages.KINDS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysv.artifacts.checkpoint import load_training_state
from raysv.artifacts.layout import RunLayout
from raysv.artifacts.shards import manifest_rows
from raysv.config import to_dict
from raysv.run_config import Config
from raysv.runtime import storage_path
from raysv.train.trainer import TrainSettings

log = logging.getLogger("raysv")


@dataclass(frozen=True)
class Stage:
    id: str  # e.g. "round_1/finetune"
    kind: str  # a key of raysv.stages.KINDS
    round: int
    model: str  # id of the stage whose model this stage uses or makes
    settings_round: int = 0  # the round whose ``rounds.overrides`` apply to this stage (0: none)
    source: str | None = None  # a training stage that continues another's model: that stage's id

    @property
    def folder(self) -> str:
        return self.id


@dataclass
class StageContext:
    """What a stage runs with: its own config (round overrides applied), the run's layout, tracking."""

    cfg: Config
    stage: Stage
    layout: RunLayout
    mlflow: dict[str, Any] | None = None
    fault: dict[str, Any] | None = None

    @property
    def folder(self) -> Path:
        return self.layout.stage(self.stage.id)

    @property
    def train_name(self) -> str:
        return train_run_name(self.cfg, self.stage.id)


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)  # logged to the stage's MLflow run
    parent_metrics: dict[str, float] = field(default_factory=dict)  # logged to the pipeline's MLflow run


class StageKind:
    """One kind of stage. ``trains``: it makes a model folder (``<stage>/model``)."""

    name = "stage"
    trains = False

    def settings(self, cfg: Config) -> Config:
        """The config this kind of stage runs with, from its round's config (default: that config)."""
        return cfg

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        """The part of the (round's) config this stage's output depends on: a change here invalidates it."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError

    def summarise(self, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Add this stage's figures to its model's row of the results table."""


# ---------------------------------------------------------------- shared by the training stages


def data_slice(cfg: Config) -> dict[str, Any]:
    return {"shards": cfg.data.shards, "augment": to_dict(cfg.data.augment)}


def train_run_name(cfg: Config, stage_id: str) -> str:
    """The Ray Train run name of a pipeline stage (its storage folder)."""
    return f"{cfg.name}-{stage_id.replace('/', '-')}"


def train_settings(cfg: Config, run_name: str, out: str | Path | None = None) -> TrainSettings:
    """How a stage trains; ``out`` (the model folder) places the per-epoch progress file beside it."""
    return TrainSettings(
        run_name=run_name,
        storage=storage_path(cfg.ray, cfg.run_dir),
        ray=cfg.ray,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        prefetch_batches=cfg.data.prefetch_batches,
        num_to_keep=cfg.checkpoint.num_to_keep,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch,
        progress_file=str(Path(out).resolve().parent / "progress.log") if out is not None else None,
    )


def standalone_run_name(cfg: Config, kind: str, out: str | Path) -> str:
    """The Ray Train run of a single-stage command, keyed by its output folder: another ``--out`` is another run."""
    import hashlib

    digest = hashlib.sha1(str(Path(out).resolve()).encode()).hexdigest()[:10]
    return f"{cfg.name}-{kind}-{digest}"


def steps_per_epoch(rows: int, batch_size: int, num_workers: int, cap: int | None = None) -> int:
    """Full batches of ``batch_size`` (global, split over the workers) in an epoch of ``rows``, at most ``cap``.

    The cap (``train.max_steps_per_epoch``) is applied here so that the schedules, which count
    steps per epoch, end where the shortened epochs do.
    """
    per_worker = max(batch_size // num_workers, 1)
    steps = max(rows // num_workers // per_worker, 1)
    return steps if cap is None else min(steps, cap)


def shard_count(shards: str | Path) -> int:
    """Number of utterances in the shards, from ``manifest.parquet``."""
    return manifest_rows(shards)


def pretrained_backbone(cfg: Config) -> str | None:
    """Where the round model's pre-trained WavLM comes from: hub id, folder, or a tiny one built here.

    ``finetune.model.tiny`` builds a randomly initialised small WavLM once, saves it with
    ``save_pretrained`` under the run directory, and returns that folder, so it is then
    loaded through the same ``from_pretrained`` path as a real checkpoint.
    """
    m = cfg.finetune.model
    if m.kind != "wavlm_mhfa":
        return None
    if not m.tiny:
        return m.pretrained
    from raysv.models.wavlm_mhfa import save_tiny_wavlm

    folder = cfg.layout.tiny_wavlm.resolve()
    if not (folder / "config.json").is_file():
        save_tiny_wavlm(folder, seed=cfg.seed, **m.tiny)
    return str(folder)


def training_summary(model_dir: Path) -> dict[str, Any]:
    """The last epoch's figures of a trained model folder (loss, accuracy, …) and its peak memory."""
    history = load_training_state(model_dir).get("history", [])
    if not history:
        return {}
    last = history[-1]
    keep = ("loss", "accuracy", "dropped", "corrected", "epoch")
    summary = {k: last[k] for k in keep if k in last} | {"epochs": len(history)}
    peaks = [h["peak_rss_mb"] for h in history if "peak_rss_mb" in h]
    if peaks:
        summary["peak_rss_mb"] = max(peaks)
    return summary
