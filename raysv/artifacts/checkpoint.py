"""Checkpoint folders: ``model.pt`` (encoder weights), ``training.pt`` (state to continue), ``model.json``.

Everything is stored as plain tensors, numbers and strings so that
``torch.load(weights_only=True)`` reads it: a checkpoint never runs code on load.
``model.json`` says how to rebuild the encoder (``raysv.models.load_encoder``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from raysv.artifacts.jsonio import write_json
from raysv.audio import SAMPLE_RATE

MODEL_FILE = "model.pt"
TRAINING_FILE = "training.pt"
SPEC_FILE = "model.json"
CHECKPOINT_FILES = (MODEL_FILE, TRAINING_FILE, SPEC_FILE)


def save_model(folder: str | Path, encoder: torch.nn.Module, info: dict[str, Any] | None = None) -> Path:
    """Write the encoder's weights and ``model.json`` (its ``spec()`` plus ``info``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = getattr(encoder, "module", encoder)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(state, folder / MODEL_FILE)
    meta = {"encoder": module.spec(), "embed_dim": int(module.embed_dim), "sample_rate": SAMPLE_RATE, "threshold": None}
    meta.update(info or {})
    write_model_json(folder, meta)
    return folder


def write_model_json(folder: str | Path, meta: dict[str, Any]) -> None:
    write_json(Path(folder) / SPEC_FILE, meta)


def read_model_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a raysv checkpoint: {SPEC_FILE} is missing")
    return json.loads(path.read_text())


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's state dict from ``model.pt``."""
    weights = Path(folder) / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: {MODEL_FILE} is missing")
    return torch.load(weights, map_location="cpu", weights_only=True)


def blend_with_start(folder: str | Path, start: str | Path, start_weight: float) -> None:
    """Rewrite ``folder``'s weights as ``(1 - start_weight)·own + start_weight·start's`` (weight-space
    ensembling of a fine-tune's start and end, WiSE-FT), and say so in its ``model.json``.

    Both must be the same encoder. Integer buffers (BatchNorm's step count) keep ``folder``'s values.
    """
    if not 0.0 <= start_weight < 1.0:
        raise ValueError(f"start_weight must be in [0, 1), got {start_weight}")
    own, first = load_weights(folder), load_weights(start)
    if own.keys() != first.keys() or any(own[k].shape != first[k].shape for k in own):
        raise ValueError(f"{folder} and {start} hold different encoders: their weights cannot be blended")
    blended = {k: torch.lerp(v, first[k].to(v.dtype), start_weight) if v.is_floating_point() else v
               for k, v in own.items()}
    torch.save(blended, Path(folder) / MODEL_FILE)
    write_model_json(folder, {**read_model_json(folder), "start_weight": float(start_weight)})


def save_training_state(folder: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(folder) / TRAINING_FILE)


def load_training_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / TRAINING_FILE, map_location="cpu", weights_only=True)
