"""The run config: one schema for every command, assembled from the sections beside their code.

``load_config`` reads a YAML file, lays ``--merge`` files and ``a.b=c`` overrides over it,
checks every key and type, then the checks that span sections. ``rounds.overrides``
holds per-round changes; :func:`round_config` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raysv.artifacts.layout import RunLayout
from raysv.config import ConfigError, build, deep_merge, layered, to_dict
from raysv.data.pipelines import DataConfig
from raysv.embedding.pool import ExtractConfig
from raysv.evaluation.evaluate import EvalConfig
from raysv.methods.dino import DinoConfig
from raysv.methods.simclr import SimclrConfig
from raysv.methods.supervised import FinetuneConfig, LmftConfig
from raysv.pseudo.cluster import ClusterConfig
from raysv.runtime import RayConfig
from raysv.tracking import MlflowConfig
from raysv.train.trainer import CheckpointConfig, TrainingConfig


@dataclass
class RoundsConfig:
    """``rounds``: how many fine-tuning rounds, and per-round changes (``{2: {cluster: {k1: …}}}``)."""

    count: int = 4
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ReferenceConfig:
    """``reference``: the supervised row a run's result is compared with (its headline is the ratio)."""

    # Train the last round's model on the true speakers of the shards (gate and correction
    # off, then the large-margin stage), evaluate it, and report last-stage EER / its EER.
    supervised: bool = False
    epochs: int | None = None  # the supervised fine-tune's epochs when they must differ (default: the round's)


@dataclass
class Config:
    name: str = "run"
    runs: str = "runs"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    simclr: SimclrConfig = field(default_factory=SimclrConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    lmft: LmftConfig = field(default_factory=LmftConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs) / self.name

    @property
    def layout(self) -> RunLayout:
        return RunLayout.of(self.runs, self.name)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _int_round_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``rounds.overrides`` keys as ints: JSON (config.json) writes them as strings."""
    overrides = (data.get("rounds") or {}).get("overrides")
    if isinstance(overrides, dict) and any(isinstance(k, str) for k in overrides):
        fixed = {}
        for key, value in overrides.items():
            if isinstance(key, str) and not key.strip().lstrip("-").isdigit():
                raise ConfigError(f"rounds.overrides.{key}: rounds are numbered 1, 2, …")
            fixed[int(key)] = value
        data = {**data, "rounds": {**data["rounds"], "overrides": fixed}}
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """A checked :class:`Config` from a plain mapping (a YAML file's, or ``config.json``'s)."""
    cfg = build(Config, _int_round_keys(data))
    validate(cfg)
    return cfg


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, merge: list[str | Path] | None = None
) -> Config:
    """Load a YAML config (or the defaults), deep-merge ``merge`` files (e.g. a sweep's best
    per-round settings), then apply ``a.b=c`` overrides in order."""
    return config_from_dict(layered(path, merge, overrides))


def round_config(cfg: Config, round_index: int) -> Config:
    """The config of round ``round_index`` (1-based): base config plus that round's overrides."""
    extra = cfg.rounds.overrides.get(round_index)
    if not extra:
        return cfg
    return config_from_dict(deep_merge(cfg.to_dict(), extra))


def validate(cfg: Config) -> None:
    """Each section's own checks, then those across sections."""
    cfg.ray.validate("ray")
    cfg.data.validate("data")
    cfg.dino.validate("dino")
    cfg.cluster.validate("cluster")
    cfg.finetune.validate("finetune")
    cfg.simclr.validate("simclr")
    cfg.eval.validate("eval")
    cfg.lmft.validate("lmft")
    if cfg.train.max_steps_per_epoch is not None and cfg.train.max_steps_per_epoch < 1:
        raise ConfigError(f"train.max_steps_per_epoch: must be positive, got {cfg.train.max_steps_per_epoch}")
    if cfg.reference.epochs is not None and cfg.reference.epochs < 1:
        raise ConfigError(f"reference.epochs: must be positive, got {cfg.reference.epochs}")
    if cfg.rounds.count < 0:
        raise ConfigError(f"rounds.count: must be >= 0, got {cfg.rounds.count}")
    base = to_dict(cfg)
    for r, extra in cfg.rounds.overrides.items():
        # Rounds past rounds.count are kept, unused, so that a run can be shortened from the
        # command line (rounds.count=1) without editing the config's later rounds.
        if r < 1:
            raise ConfigError(f"rounds.overrides.{r}: rounds are numbered from 1")
        if not isinstance(extra, dict):
            raise ConfigError(f"rounds.overrides.{r}: expected a mapping")
        try:
            build(Config, deep_merge(base, extra))
        except ConfigError as err:
            raise ConfigError(f"rounds.overrides.{r}: {err}") from None
