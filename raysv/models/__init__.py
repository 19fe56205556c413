"""Neural models: encoders (waveform → embedding) and training heads.

Encoders take ``(B, samples)`` float32 waveforms at 16 kHz and return ``(B, embed_dim)``
embeddings (not normalised); each has ``embed_dim`` and ``spec()``, and
``build_encoder(spec)`` rebuilds one with random weights for a checkpoint's ``model.pt``.
``raysv.models.wavlm_mhfa`` is imported only when needed: importing transformers costs
seconds in every Ray worker that only trains ECAPA.
"""

from __future__ import annotations

from torch import nn

from raysv.models.ecapa import ECAPAEncoder, ECAPATDNN
from raysv.models.heads import AAMSoftmax, DINOHead, margin_at

__all__ = ["AAMSoftmax", "DINOHead", "ECAPAEncoder", "ECAPATDNN", "build_encoder", "margin_at"]


def build_encoder(spec: dict) -> nn.Module:
    """Rebuild an encoder from its ``spec()`` with random weights; never downloads anything."""
    kind = spec.get("kind")
    if kind == "ecapa":
        return ECAPAEncoder(
            channels=spec["channels"],
            mfa_channels=spec["mfa_channels"],
            embed_dim=spec["embed_dim"],
            n_mels=spec.get("n_mels", 80),
        )
    if kind == "wavlm_mhfa":
        from raysv.models.wavlm_mhfa import wavlm_mhfa_from_spec

        return wavlm_mhfa_from_spec(spec)
    raise ValueError(f"unknown encoder kind {kind!r} in model spec (expected 'ecapa' or 'wavlm_mhfa')")
