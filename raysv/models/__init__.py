"""Neural models: encoders (waveform → embedding) and training heads.

Encoders take ``(B, samples)`` float32 waveforms at 16 kHz and return ``(B, embed_dim)``
embeddings (not normalised); each has ``embed_dim`` and ``spec()``, and
``build_encoder(spec)`` rebuilds one with random weights for a checkpoint's ``model.pt``.
``raysv.models.wavlm_mhfa`` is imported only when needed: importing transformers costs
seconds in every Ray worker that only trains ECAPA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysv.artifacts.checkpoint import load_weights, read_model_json
from raysv.models.ecapa import ECAPAEncoder, ECAPATDNN, EcapaConfig
from raysv.models.heads import AAMSoftmax, DINOHead, margin_at

__all__ = ["AAMSoftmax", "DINOHead", "ECAPAEncoder", "ECAPATDNN", "EcapaConfig", "build_encoder", "load_encoder",
           "margin_at"]


def build_encoder(spec: dict) -> nn.Module:
    """Rebuild an encoder from its ``spec()`` with random weights; never downloads anything."""
    kind = spec.get("kind")
    if kind == "ecapa":
        return ECAPAEncoder(
            channels=spec["channels"],
            mfa_channels=spec["mfa_channels"],
            embed_dim=spec["embed_dim"],
            n_mels=spec.get("n_mels", 80),
            norm=spec.get("norm", "mean"),  # checkpoints from before the choice was recorded: mean
        )
    if kind == "wavlm_mhfa":
        from raysv.models.wavlm_mhfa import wavlm_mhfa_from_spec

        return wavlm_mhfa_from_spec(spec)
    raise ValueError(f"unknown encoder kind {kind!r} in model spec (expected 'ecapa' or 'wavlm_mhfa')")


def load_encoder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the encoder a checkpoint folder's ``model.json`` describes and load its weights, in eval mode."""
    meta = read_model_json(folder)
    encoder = build_encoder(meta["encoder"])
    encoder.load_state_dict(load_weights(folder))
    return encoder.to(device).eval(), meta
