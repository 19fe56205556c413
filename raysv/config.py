"""Typed run configuration: dataclasses, YAML loading, ``a.b=c`` overrides, validation.

One schema serves every command. Unknown keys and wrong types are errors that name
the key (``finetune.loss.margin: expected float, got 'big'``).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


# ---------------------------------------------------------------- sections


@dataclass
class TrialList:
    """A VoxCeleb-format trial list and the folder its paths are relative to."""

    path: str = ""
    audio_root: str = ""


@dataclass
class AugmentConfig:
    """MUSAN-layout noise folder and RIR folder; ``null`` uses synthetic noise and rooms."""

    musan: str | None = None
    rir: str | None = None
    noise_prob: float = 0.6
    reverb_prob: float = 0.3
    eq_prob: float = 0.0  # random channel response (tilt, peaks/notches, band limit) per crop
    eq_db: float = 6.0
    snr_noise: tuple[float, float] = (0.0, 15.0)
    snr_music: tuple[float, float] = (5.0, 15.0)
    snr_babble: tuple[float, float] = (13.0, 20.0)
    babble_speakers: tuple[int, int] = (3, 7)


@dataclass
class DataConfig:
    shards: str = "data/train_shards"
    trials: dict[str, TrialList] = field(default_factory=dict)
    dev_trials: TrialList | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 256
    mix_row_groups: int = 8  # row groups read and shuffled together per read task (shards are in speaker order)
    prefetch_batches: int = 4  # batches each training worker keeps ready ahead of its step
    sample_rate: int = 16000


@dataclass
class RayConfig:
    address: str | None = None
    num_workers: int = 2
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    data_cpus: int | None = 2  # logical CPUs Ray Data may use while the trainers run (null: no limit)
    storage: str | None = None  # Ray Train storage; default <runs>/<name>/ray
    max_failures: int = 0
    num_cpus: int | None = None  # logical CPUs of a local cluster started by raysv


@dataclass
class EcapaConfig:
    channels: int = 1024
    mfa_channels: int = 3072
    embed_dim: int = 192
    n_mels: int = 80


@dataclass
class CropConfig:
    global_count: int = 2
    global_seconds: float = 4.0
    local_count: int = 4
    local_seconds: float = 2.0


@dataclass
class DinoHeadConfig:
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 65536


@dataclass
class SgdConfig:
    lr: float = 0.2
    min_lr: float = 5e-5
    weight_decay: float = 5e-5
    momentum: float = 0.9
    warmup_epochs: int = 10


@dataclass
class DiversityConfig:
    """Weights of the regularisers on the student's embeddings against dimensional collapse (0: off)."""

    variance: float = 0.0  # hinge on each dimension's batch standard deviation (below 1)
    covariance: float = 0.0  # squared off-diagonal covariances: redundant dimensions


@dataclass
class DinoConfig:
    encoder: EcapaConfig = field(default_factory=EcapaConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    head: DinoHeadConfig = field(default_factory=DinoHeadConfig)
    optim: SgdConfig = field(default_factory=SgdConfig)
    epochs: int = 80
    batch_size: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0
    diversity: DiversityConfig = field(default_factory=DiversityConfig)


@dataclass
class ClusterConfig:
    k1: int = 50000
    k2: int | None = 7500
    min_cluster_size: int = 0
    niter: int = 20
    seed: int = 0


@dataclass
class RoundModelConfig:
    """The model fine-tuned in rounds ≥ 1: WavLM + MHFA (reference) or ECAPA-TDNN."""

    kind: str = "wavlm_mhfa"  # wavlm_mhfa | ecapa
    pretrained: str | None = "microsoft/wavlm-base-plus"  # hub id or local folder
    tiny: dict[str, int] | None = None  # build a tiny random WavLM of these sizes instead
    heads: int = 64
    compression: int = 128
    embed_dim: int = 256
    grad_mult: float = 1.0
    ecapa: EcapaConfig = field(default_factory=EcapaConfig)
    ecapa_init: str = "dino"  # dino | scratch


@dataclass
class MarginLossConfig:
    margin: float = 0.2
    scale: float = 30.0
    margin_warmup_epochs: float = 0.0


@dataclass
class LrConfig:
    backbone: float = 2e-5
    head: float = 5e-3
    decay: float = 0.95  # multiplied in every epoch
    weight_decay: float = 1e-4
    # Fine-tuning: the backbone's rate ramps up linearly from 0 over this many epochs, so the
    # new (random) classifier settles before its gradients reach the pre-trained encoder.
    backbone_warmup_epochs: float = 0.0


@dataclass
class SimclrConfig:
    """End-to-end contrastive baseline: V crops per utterance, (AM-)NT-Xent over the global batch, no labels."""

    enabled: bool = False  # also train it as a baseline stage of `raysv run`
    views: int = 2
    crop_seconds: float = 3.0
    temperature: float = 0.03
    margin: float = 0.0  # additive margin on the positive cosine (AM-NT-Xent)
    projector: bool = False
    projector_dim: int = 256
    epochs: int = 10
    batch_size: int = 256  # global, split over the workers; negatives gathered from all of them
    lr: LrConfig = field(default_factory=LrConfig)  # backbone / back-end rates, per-epoch decay
    warmup_epochs: float = 0.0
    clip_grad: float = 5.0


@dataclass
class LossGateConfig:
    enabled: bool = True
    start_epoch: int = 5


@dataclass
class LabelCorrectionConfig:
    enabled: bool = True
    start_epoch: int = 9
    temperature: float = 0.1
    threshold: float = 0.5


@dataclass
class FinetuneConfig:
    model: RoundModelConfig = field(default_factory=RoundModelConfig)
    loss: MarginLossConfig = field(default_factory=MarginLossConfig)
    lr: LrConfig = field(default_factory=LrConfig)
    loss_gate: LossGateConfig = field(default_factory=LossGateConfig)
    label_correction: LabelCorrectionConfig = field(default_factory=LabelCorrectionConfig)
    epochs: int = 15
    batch_size: int = 120
    crop_seconds: float = 3.0
    l2sp: float = 0.01
    clip_grad: float = 5.0
    init: str = "pretrained"  # pretrained | previous (start round r from round r-1's model)


@dataclass
class RoundsConfig:
    count: int = 4
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LmftConfig:
    enabled: bool = True
    crop_seconds: float = 6.0
    margin: float = 0.5
    epochs: int = 5
    lr_scale: float = 0.5


@dataclass
class AsNormConfig:
    top_n: int | None = None  # None disables AS-norm
    cohort_size: int = 20000


@dataclass
class EvalConfig:
    crops: int = 15
    crop_seconds: float = 4.0
    max_seconds: float = 30.0
    asnorm: AsNormConfig = field(default_factory=AsNormConfig)
    seed: int = 0


@dataclass
class ExtractConfig:
    max_seconds: float = 20.0
    batch_size: int = 16
    num_actors: int | None = None  # default: one per GPU, else 2 CPU actors


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # default sqlite:///<runs>/mlflow.db; MLFLOW_TRACKING_URI wins
    experiment: str = "raysv"


@dataclass
class CheckpointConfig:
    num_to_keep: int | None = 2


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs) / self.name

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# ---------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: may not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args
        return {_convert(k, kt, f"{key}.{k}"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data: tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------- overrides


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``, mapping by mapping."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=c`` → ``{"a": {"b": c}}``, with ``c`` read as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict[Any, Any] = {}
    node = nested
    # Numeric parts are round numbers (rounds.overrides.2...), as YAML reads them: ints.
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with path.open() as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, merge: list[str | Path] | None = None
) -> Config:
    """Load a YAML config (or the defaults), deep-merge ``merge`` files (e.g. a sweep's best
    per-round settings), then apply ``a.b=c`` overrides in order."""
    data: dict[str, Any] = _read_yaml(path) if path is not None else {}
    for extra in merge or []:
        data = deep_merge(data, _read_yaml(extra))
    for text in overrides or []:
        data = deep_merge(data, parse_override(text))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def round_config(cfg: Config, round_index: int) -> Config:
    """The config of round ``round_index`` (1-based): base config plus that round's overrides."""
    extra = cfg.rounds.overrides.get(round_index)
    if not extra:
        return cfg
    return config_from_dict(deep_merge(cfg.to_dict(), extra))


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def _positive(key: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value}")


def validate(cfg: Config) -> None:
    """Checks across keys that the types alone cannot express."""
    _choice("ray.use_gpu", str(cfg.ray.use_gpu).lower(), ("auto", "true", "false"))
    _choice("finetune.model.kind", cfg.finetune.model.kind, ("wavlm_mhfa", "ecapa"))
    _choice("finetune.model.ecapa_init", cfg.finetune.model.ecapa_init, ("dino", "scratch"))
    _choice("finetune.init", cfg.finetune.init, ("pretrained", "previous"))
    _positive("ray.num_workers", cfg.ray.num_workers)
    _positive("dino.epochs", cfg.dino.epochs)
    _positive("dino.batch_size", cfg.dino.batch_size)
    _positive("finetune.epochs", cfg.finetune.epochs)
    _positive("finetune.batch_size", cfg.finetune.batch_size)
    _positive("finetune.crop_seconds", cfg.finetune.crop_seconds)
    if cfg.finetune.lr.backbone_warmup_epochs < 0:
        raise ConfigError(
            f"finetune.lr.backbone_warmup_epochs: must be >= 0, got {cfg.finetune.lr.backbone_warmup_epochs}"
        )
    _positive("cluster.k1", cfg.cluster.k1)
    _positive("cluster.k2", cfg.cluster.k2)
    if cfg.cluster.k2 is not None and cfg.cluster.k2 >= cfg.cluster.k1:
        raise ConfigError(f"cluster.k2 ({cfg.cluster.k2}) must be smaller than cluster.k1 ({cfg.cluster.k1})")
    _positive("simclr.epochs", cfg.simclr.epochs)
    _positive("simclr.batch_size", cfg.simclr.batch_size)
    _positive("simclr.crop_seconds", cfg.simclr.crop_seconds)
    _positive("simclr.temperature", cfg.simclr.temperature)
    if cfg.simclr.views < 2:
        raise ConfigError(f"simclr.views: a contrastive loss needs at least 2 views per utterance, got {cfg.simclr.views}")
    if cfg.simclr.batch_size < 2:
        raise ConfigError(f"simclr.batch_size: needs at least 2 utterances per batch for negatives, got {cfg.simclr.batch_size}")
    for name in ("variance", "covariance"):
        if getattr(cfg.dino.diversity, name) < 0:
            raise ConfigError(f"dino.diversity.{name}: must be >= 0, got {getattr(cfg.dino.diversity, name)}")
    if cfg.dino.crops.global_count < 2:
        raise ConfigError("dino.crops.global_count: DINO needs at least 2 global crops")
    if cfg.rounds.count < 0:
        raise ConfigError(f"rounds.count: must be >= 0, got {cfg.rounds.count}")
    for r, extra in cfg.rounds.overrides.items():
        # Rounds past rounds.count are kept, unused, so that a run can be shortened from the
        # command line (rounds.count=1) without editing the config's later rounds.
        if r < 1:
            raise ConfigError(f"rounds.overrides.{r}: rounds are numbered from 1")
        if not isinstance(extra, dict):
            raise ConfigError(f"rounds.overrides.{r}: expected a mapping")
        try:
            from_dict(Config, deep_merge(to_dict(cfg), extra))
        except ConfigError as err:
            raise ConfigError(f"rounds.overrides.{r}: {err}") from None
    if cfg.finetune.model.kind == "wavlm_mhfa" and not (cfg.finetune.model.pretrained or cfg.finetune.model.tiny):
        raise ConfigError("finetune.model: wavlm_mhfa needs `pretrained` (hub id or folder) or `tiny` sizes")
