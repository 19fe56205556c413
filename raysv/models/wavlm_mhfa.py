"""WavLM + MHFA: the encoder fine-tuned on pseudo-labels in rounds r ≥ 1.

Reads top to bottom: WavLM configs (reference Base+ shapes, a tiny one for tests and the
demo) → the gradient multiplier → the MHFA back-end (Peng et al., SLT 2022) → the
``WavLMMHFA`` encoder → loading from a hub id or a local folder.

Input normalisation: the original WavLM code normalises each utterance to zero mean and
unit variance only when its config says ``normalize`` — true for WavLM Large (whose feature
encoder uses layer norm, ``feat_extract_norm="layer"``; Hugging Face ``do_normalize=True``),
false for WavLM Base and Base+ (group norm, ``do_normalize=False``). ``WavLMMHFA`` follows
the same convention: it reads ``do_normalize`` from a local folder's
``preprocessor_config.json`` when there is one, and otherwise decides from
``feat_extract_norm``; an explicit ``normalize=`` overrides both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel


def reference_wavlm_base_plus_config() -> WavLMConfig:
    """WavLM Base+ shapes (94.4 M parameters), for sizing and tests without downloading weights."""
    return WavLMConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        conv_dim=(512,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        feat_extract_norm="group",
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        num_buckets=320,
        max_bucket_distance=800,
        do_stable_layer_norm=False,
    )


def tiny_wavlm_config(
    hidden_size: int = 64, layers: int = 2, heads: int = 2, intermediate: int = 128, conv_dim: int = 32
) -> WavLMConfig:
    """A WavLM small enough for CPU tests and the demo, with the real model's 320× downsampling.

    Same conv kernels and strides (20 ms frames at 16 kHz), gated relative position bias and
    group-norm feature encoder as Base+; only the widths, depth and positional conv shrink.
    """
    return WavLMConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        conv_dim=(conv_dim,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=False,
        feat_extract_norm="group",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_buckets=320,
        max_bucket_distance=800,
        do_stable_layer_norm=False,
        layerdrop=0.0,
    )


def save_tiny_wavlm(path: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Save a randomly initialised tiny WavLM (and its preprocessor config) like a hub folder.

    Tests and the demo then load it with ``from_pretrained`` exactly as a user loads
    ``microsoft/wavlm-base-plus``. ``sizes`` are ``tiny_wavlm_config`` arguments.
    """
    return save_random_wavlm(path, tiny_wavlm_config(**sizes), seed)


def save_random_wavlm(path: str | Path, config: WavLMConfig, seed: int = 0) -> Path:
    """A randomly initialised WavLM of ``config`` saved as a pre-trained folder (weights, configs).

    ``reference_wavlm_base_plus_config()`` gives the reference run's architecture at full size,
    for rehearsing it where the hub cannot be reached.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = WavLMModel(config)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False, return_attention_mask=True
    ).save_pretrained(path)
    return path


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward: a smaller learning signal for the backbone."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class MHFA(nn.Module):
    """Multi-head factorised attentive pooling over all WavLM hidden states.

    Keys and values are two learned softmax-weighted sums over the hidden states (CNN
    projection + every transformer layer), each compressed to ``compression`` dims. Each of
    ``heads`` attention heads scores frames from the keys, softmax over time, and pools the
    values; the ``heads × compression`` pooled vectors are concatenated and projected to
    ``embed_dim``. At Base+ shapes (768, 13 states, 64 heads, 128, 256): 2,302,554 parameters,
    the same layout as the reference implementation.
    """

    def __init__(
        self, num_hidden_states: int, hidden_size: int, heads: int = 64, compression: int = 128, embed_dim: int = 256
    ):
        super().__init__()
        self.num_hidden_states = num_hidden_states
        self.heads = heads
        self.compression = compression
        self.embed_dim = embed_dim
        self.layer_weights_k = nn.Parameter(torch.ones(num_hidden_states))
        self.layer_weights_v = nn.Parameter(torch.ones(num_hidden_states))
        self.compress_k = nn.Linear(hidden_size, compression)
        self.compress_v = nn.Linear(hidden_size, compression)
        self.attention = nn.Linear(compression, heads)
        self.proj = nn.Linear(heads * compression, embed_dim)

    def forward(self, hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """``hidden_states``: ``num_hidden_states`` tensors ``(B, T, hidden)`` → ``(B, embed_dim)``."""
        if len(hidden_states) != self.num_hidden_states:
            raise ValueError(f"MHFA expects {self.num_hidden_states} hidden states, got {len(hidden_states)}")
        stacked = torch.stack(tuple(hidden_states), dim=-1)  # (B, T, hidden, L)
        k = stacked @ torch.softmax(self.layer_weights_k, dim=0)
        v = stacked @ torch.softmax(self.layer_weights_v, dim=0)
        k = self.compress_k(k)  # (B, T, c)
        v = self.compress_v(v)  # (B, T, c)
        att = torch.softmax(self.attention(k), dim=1)  # (B, T, H), over time
        pooled = torch.einsum("bth,btc->bhc", att, v)  # (B, H, c)
        return self.proj(pooled.flatten(1))


def _no_grad_pre_hook(module: nn.Module, args: tuple) -> None:
    """Turn autograd off for the frozen CNN; ``_restore_grad_hook`` turns it back on after."""
    module._grad_enabled_before = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _restore_grad_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Give the transformer back the grad mode the caller had."""
    torch.set_grad_enabled(getattr(module, "_grad_enabled_before", True))


def _normalize_from_folder(pretrained: str | None) -> bool | None:
    """``do_normalize`` from a local folder's ``preprocessor_config.json``, or None when there is none."""
    if pretrained is None:
        return None
    cfg = Path(pretrained) / "preprocessor_config.json"
    if not cfg.is_file():
        return None
    return bool(json.loads(cfg.read_text()).get("do_normalize", False))


class WavLMMHFA(nn.Module):
    """WavLM backbone + MHFA back-end: waveform ``(B, samples)`` at 16 kHz → ``(B, embed_dim)``.

    The CNN feature encoder is frozen and runs without autograd; the transformer is
    fine-tuned, its gradient from the back-end scaled by ``grad_mult``. LayerDrop is turned
    off because MHFA needs every layer's output on every step. Batches are equal-length
    crops, so no attention mask is used.
    """

    def __init__(
        self,
        backbone: WavLMModel,
        heads: int = 64,
        compression: int = 128,
        embed_dim: int = 256,
        grad_mult: float = 1.0,
        normalize: bool | None = None,
        pretrained: str | None = None,
    ):
        super().__init__()
        backbone.config.layerdrop = 0.0
        backbone.freeze_feature_encoder()
        backbone.feature_extractor.register_forward_pre_hook(_no_grad_pre_hook)
        backbone.feature_extractor.register_forward_hook(_restore_grad_hook)
        self.backbone = backbone
        self.heads = heads
        self.compression = compression
        self.embed_dim = embed_dim
        self.grad_mult = float(grad_mult)
        self.pretrained = pretrained
        if normalize is None:
            normalize = _normalize_from_folder(pretrained)
        if normalize is None:
            normalize = backbone.config.feat_extract_norm == "layer"
        self.normalize = bool(normalize)
        self.mhfa = MHFA(
            num_hidden_states=backbone.config.num_hidden_layers + 1,
            hidden_size=backbone.config.hidden_size,
            heads=heads,
            compression=compression,
            embed_dim=embed_dim,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            wave = wave.unsqueeze(0)
        wave = wave.float()
        if self.normalize:
            wave = (wave - wave.mean(dim=1, keepdim=True)) / (wave.std(dim=1, keepdim=True) + 1e-7)
        grad_enabled = torch.is_grad_enabled()
        try:
            out = self.backbone(wave, output_hidden_states=True)
        finally:
            torch.set_grad_enabled(grad_enabled)
        hidden = out.hidden_states
        if self.grad_mult != 1.0 and grad_enabled:
            hidden = tuple(GradMultiply.apply(h, self.grad_mult) for h in hidden)
        return self.mhfa(hidden)

    def spec(self) -> dict:
        """Everything ``raysv.models.build_encoder`` needs to rebuild this architecture, JSON-serialisable."""
        return {
            "kind": "wavlm_mhfa",
            "wavlm_config": json.loads(self.backbone.config.to_json_string(use_diff=False)),
            "heads": self.heads,
            "compression": self.compression,
            "embed_dim": self.embed_dim,
            "grad_mult": self.grad_mult,
            "normalize": self.normalize,
            "pretrained": self.pretrained,
        }


def load_wavlm_mhfa(
    pretrained: str,
    heads: int = 64,
    compression: int = 128,
    embed_dim: int = 256,
    grad_mult: float = 1.0,
    normalize: bool | None = None,
) -> WavLMMHFA:
    """Pre-trained WavLM from a hub id (``microsoft/wavlm-base-plus``) or a local folder, plus a fresh MHFA."""
    backbone = WavLMModel.from_pretrained(str(pretrained))
    return WavLMMHFA(
        backbone,
        heads=heads,
        compression=compression,
        embed_dim=embed_dim,
        grad_mult=grad_mult,
        normalize=normalize,
        pretrained=str(pretrained),
    )


def wavlm_mhfa_from_spec(spec: dict) -> WavLMMHFA:
    """Rebuild a ``WavLMMHFA`` from ``spec()`` with random weights, never touching the network."""
    config = WavLMConfig.from_dict(spec["wavlm_config"])
    return WavLMMHFA(
        WavLMModel(config),
        heads=spec["heads"],
        compression=spec["compression"],
        embed_dim=spec["embed_dim"],
        grad_mult=spec.get("grad_mult", 1.0),
        normalize=spec.get("normalize"),
        pretrained=spec.get("pretrained"),
    )
