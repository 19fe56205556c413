"""The sweep YAML: which run and round, what to search, how trials are scheduled; its checks."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysv.artifacts.shards import manifest_speakers
from raysv.config import ConfigError, build, deep_merge, parse_override
from raysv.run_config import Config, config_from_dict, round_config

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# What a trial runs (clustering and fine-tuning of one round) depends only on these keys.
SWEEPABLE = ("cluster.", "finetune.", "data.augment.", "data.shuffle_buffer", "seed")


@dataclass
class SchedulerSpec:
    type: str = "asha"  # asha | fifo
    grace_period: int = 1
    max_t: int | None = None  # default: the round's finetune.epochs
    reduction_factor: float = 4.0


@dataclass
class SweepSpec:
    """The sweep YAML: which run and round, what to search, how to schedule trials."""

    config: str
    search_space: dict[str, dict[str, Any]]
    round: int = 1
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    metric: str = "dev_eer"
    mode: str = "min"
    name: str = "sweep"
    output: str | None = None  # relative to <run_dir>/sweeps/<name>; default best.yaml
    max_concurrent_trials: int | None = None  # default: as many as the cluster's resources fit


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def plain(value: Any) -> Any:
    """NumPy scalars from samplers → Python numbers, so YAML and MLflow take them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, list[str]]:
    """Read and check a sweep YAML; ``sweep.<key>=v`` overrides go to it, the others to the run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    run_overrides: list[str] = []
    for text in overrides or []:
        if text.startswith("sweep."):
            data = deep_merge(data, parse_override(text[len("sweep."):]))
        else:
            run_overrides.append(text)
    missing = [k for k in ("config", "search_space") if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    try:
        spec = build(SweepSpec, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if spec.scheduler.type not in ("asha", "fifo"):
        raise ConfigError(f"{path}: scheduler.type: expected asha or fifo, got {spec.scheduler.type!r}")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"{path}: mode: expected min or max, got {spec.mode!r}")
    if spec.num_samples < 1 or spec.scheduler.grace_period < 1 or spec.scheduler.reduction_factor <= 1:
        raise ConfigError(f"{path}: num_samples and scheduler.grace_period must be >= 1, reduction_factor > 1")
    if not spec.search_space:
        raise ConfigError(f"{path}: search_space is empty")
    if not spec.name or "/" in spec.name:
        raise ConfigError(f"{path}: name: a non-empty folder name, got {spec.name!r}")
    config = Path(spec.config)
    if not config.is_absolute() and not config.is_file() and (path.parent / config).is_file():
        spec.config = str(path.parent / config)
    return spec, list(spec.overrides) + run_overrides


def _candidates(key: str, spec: Any) -> list[Any]:
    """The values a search-space entry can take that are worth checking against the schema."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"search_space.{key}: expected one of {{{': […]}, {'.join(KINDS)}: […]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search_space.{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"search_space.{key}.{kind}: expected [low, high], got {values!r}")
        if not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError(f"search_space.{key}.{kind}: need 0 < low < high for loguniform, low < high otherwise")
        return [values[0], values[1] - 1 if kind == "randint" else values[1]]
    return list(values)


def check_search_space(cfg: Config, round_index: int, space: dict[str, dict[str, Any]]) -> None:
    """Every key must be a real config key a trial uses; every value must pass the run config's checks."""
    base = round_config(cfg, round_index).to_dict()
    values: dict[str, list[Any]] = {}
    for key, spec in space.items():
        if not key.startswith(SWEEPABLE) or key.endswith("."):
            raise ConfigError(
                f"search_space.{key}: a trial clusters and fine-tunes round {round_index}, so only "
                f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in SWEEPABLE)} can change it"
            )
        values[key] = _candidates(key, spec)
        for value in values[key]:
            try:
                config_from_dict(deep_merge(base, nested({key: value})))
            except ConfigError as err:
                raise ConfigError(f"search_space.{key} = {value!r}: {err}") from None
    combos = list(itertools.islice(itertools.product(*values.values()), 2000))
    for combo in combos:  # cross-key checks, e.g. cluster.k2 < cluster.k1
        params = dict(zip(values, combo))
        try:
            config_from_dict(deep_merge(base, nested(params)))
        except ConfigError as err:
            raise ConfigError(f"search_space: {params} is not a valid config: {err}") from None


def _speakers_of(trials_path: str) -> set[str]:
    from raysv.data.trials import read_trials

    return {u.split("/", 1)[0] for u in read_trials(trials_path).utterances() if "/" in u}


def check_dev_trials(cfg: Config) -> None:
    """The dev list must exist and share no speaker with the training shards or the test lists."""
    dev = cfg.data.dev_trials
    if dev is None or not dev.path:
        raise ConfigError(
            "data.dev_trials: a sweep scores trials on a dev trial list whose speakers are in neither "
            "the training data nor the test lists; set data.dev_trials: {path: …, audio_root: …}"
        )
    dev_speakers = _speakers_of(dev.path)
    clash: dict[str, set[str]] = {}
    for name, trial_list in cfg.data.trials.items():
        if Path(trial_list.path).resolve() == Path(dev.path).resolve():
            raise ConfigError(f"data.dev_trials: {dev.path} is also the test list data.trials.{name}")
        if Path(trial_list.path).is_file():
            clash[f"data.trials.{name}"] = dev_speakers & _speakers_of(trial_list.path)
    if (Path(cfg.data.shards) / "manifest.parquet").is_file():
        clash["the training shards"] = dev_speakers & manifest_speakers(cfg.data.shards)
    for where, shared in clash.items():
        if shared:
            raise ConfigError(
                f"data.dev_trials: {len(shared)} speakers of {dev.path} are also in {where} "
                f"(e.g. {', '.join(sorted(shared)[:3])}); use a dev list of other speakers"
            )


