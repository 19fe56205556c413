"""Checkpoint folders: ``model.pt`` (encoder weights), ``training.pt`` (state to continue), ``model.json``.

Everything is stored as plain tensors, numbers and strings so that
``torch.load(weights_only=True)`` reads it: a checkpoint never runs code on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

MODEL_FILE = "model.pt"
TRAINING_FILE = "training.pt"
SPEC_FILE = "model.json"


def save_model(folder: str | Path, encoder: torch.nn.Module, info: dict[str, Any] | None = None) -> Path:
    """Write the encoder's weights and ``model.json`` (its spec plus ``info``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = getattr(encoder, "module", encoder)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(state, folder / MODEL_FILE)
    meta = {"encoder": module.spec(), "embed_dim": int(module.embed_dim), "sample_rate": 16000, "threshold": None}
    meta.update(info or {})
    write_model_json(folder, meta)
    return folder


def write_model_json(folder: str | Path, meta: dict[str, Any]) -> None:
    path = Path(folder) / SPEC_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(path)


def read_model_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a raysv checkpoint: {SPEC_FILE} is missing")
    return json.loads(path.read_text())


def load_encoder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the encoder described by ``model.json`` and load its weights, in eval mode."""
    from raysv.models import build_encoder

    folder = Path(folder)
    meta = read_model_json(folder)
    weights = folder / MODEL_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: {MODEL_FILE} is missing")
    encoder = build_encoder(meta["encoder"])
    encoder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return encoder.to(device).eval(), meta


def save_training_state(folder: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(folder) / TRAINING_FILE)


def load_training_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / TRAINING_FILE, map_location="cpu", weights_only=True)
