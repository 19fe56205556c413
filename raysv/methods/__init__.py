"""Training methods, by name: each with its config section, loss and step (sslsv's one-folder-per-method).

``METHODS`` is the registry the shared training loop looks a method up in; a method
receives its own section, never the whole run config.
"""

from __future__ import annotations

from typing import Any

from raysv.config import build
from raysv.methods.base import Method
from raysv.methods.dino import DinoMethod
from raysv.methods.simclr import SimclrMethod
from raysv.methods.supervised import SupervisedMethod

METHODS: dict[str, type[Method]] = {m.name: m for m in (DinoMethod, SimclrMethod, SupervisedMethod)}


def build_method(name: str, section: dict[str, Any], seed: int, args: dict[str, Any]) -> Method:
    """The method ``name`` built from its config section (a plain mapping) and the driver's ``args``."""
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r} ({', '.join(sorted(METHODS))})")
    cls = METHODS[name]
    return cls(build(cls.config_class, section, name), seed=seed, **args)
