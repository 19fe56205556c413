"""The config frame: typed dataclass sections, YAML files merged in order, ``a.b=c`` overrides.

Sections are plain dataclasses defined beside the code they configure (``DinoConfig`` in
``raysv.methods.dino``, ``ClusterConfig`` in ``raysv.pseudo.cluster``, …); the run's
schema that assembles them is ``raysv.run_config.Config``. OmegaConf's structured
configs check keys and types; every error becomes one :class:`ConfigError` naming the
key (``finetune.loss.margin: expected a number, got 'big'``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


# ---------------------------------------------------------------- typed building


def build(schema: type[T], data: dict[str, Any] | None = None, prefix: str = "") -> T:
    """An instance of dataclass ``schema`` from a plain mapping, every key and type checked."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data or {}))
        return OmegaConf.to_object(node)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err, schema, prefix)) from None


def _describe(err: Exception, schema: type, prefix: str) -> str:
    from omegaconf.errors import ConfigKeyError, ValidationError

    key = str(getattr(err, "full_key", "") or "")
    key = f"{prefix}.{key}" if prefix and key else (key or prefix or "config")
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ConfigKeyError):
        return f"{key}: unknown key (known: {', '.join(_known_keys(schema, key, prefix))})"
    if isinstance(err, ValidationError):
        value = first.split("'")[1] if first.startswith("Value '") else None
        for word, wanted in (("Float", "a number"), ("Integer", "an integer"), ("Boolean", "true or false"),
                             ("String", "a string")):
            if f"converted to {word}" in first:
                return f"{key}: expected {wanted}, got {value!r}"
        if "Non optional field" in first or "field cannot be None" in first.lower():
            return f"{key}: may not be null"
    return f"{key}: {first}"


def _known_keys(schema: type, key: str, prefix: str) -> list[str]:
    """Field names of the section that holds ``key`` (for 'unknown key' messages)."""
    import typing

    parts = key.split(".")
    if prefix:
        parts = parts[len(prefix.split(".")):]
    cls: Any = schema
    key_next = False  # the part after a dict-valued field is one of its keys
    for part in parts[:-1]:
        if key_next:
            key_next = False
            continue
        if not dataclasses.is_dataclass(cls):
            return []
        annotation = typing.get_type_hints(cls).get(part)
        key_next = typing.get_origin(annotation) is dict
        # X, X | None or dict[str, X]: the dataclass it names.
        inner = [tp for tp in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(tp)]
        if not inner:
            return []
        cls = inner[0]
    return sorted(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data from a config dataclass: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------- YAML and overrides


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``, mapping by mapping (later wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def differences(old: Any, new: Any, default: Any = None, prefix: str = "") -> list[str]:
    """The keys whose values differ between two nested config dicts, as ``key: old → new`` lines.

    With ``default`` (the same slice of a default config), a key the old config lacks whose new
    value is that default is no change: the setting was added to raysv after the old config was
    recorded, and its default does what raysv did then.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        default = default if isinstance(default, dict) else {}
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key not in old and key in default and new[key] == default[key]:
                continue
            out += differences(old.get(key), new.get(key), default.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=c`` → ``{"a": {"b": c}}``, with ``c`` read as YAML (numbers, null, lists, mappings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: not a YAML value ({err})") from None
    nested: dict[Any, Any] = {}
    node = nested
    # Numeric parts are round numbers (rounds.overrides.2...), as YAML reads them: ints.
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open() as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def layered(path: str | Path | None, merge: list[str | Path] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The plain mapping of a YAML file, ``merge`` files laid over it in order, then ``a.b=c`` overrides."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for extra in merge or []:
        data = deep_merge(data, read_yaml(extra))
    for text in overrides or []:
        data = deep_merge(data, parse_override(text))
    return data


# ---------------------------------------------------------------- checks shared by sections


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


def check_positive(key: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value}")


def check_non_negative(key: str, value: float | int | None) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{key}: must be >= 0, got {value}")
