"""The model fine-tuned in rounds >= 1 (and by the contrastive baseline), built from its config.

WavLM + MHFA from a pre-trained hub id or folder (the reference), or the ECAPA-TDNN of
round 0, from scratch or from a checkpoint (e.g. the DINO encoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from raysv.config import ConfigError, check_choice
from raysv.models.ecapa import ECAPAEncoder, EcapaConfig


@dataclass
class RoundModelConfig:
    """``finetune.model``: WavLM + MHFA (reference) or ECAPA-TDNN."""

    kind: str = "wavlm_mhfa"  # wavlm_mhfa | ecapa
    pretrained: str | None = "microsoft/wavlm-base-plus"  # hub id or local folder
    tiny: dict[str, int] | None = None  # build a tiny random WavLM of these sizes instead
    heads: int = 64
    compression: int = 128
    embed_dim: int = 256
    grad_mult: float = 1.0
    # What of WavLM trains: its transformer layers (the reference; the CNN, feature projection,
    # positional convolution and encoder LayerNorm keep their pre-trained values) or all but the CNN.
    trainable: str = "layers"  # layers | all_but_cnn
    ecapa: EcapaConfig = field(default_factory=EcapaConfig)
    ecapa_init: str = "dino"  # dino | scratch

    def validate(self, prefix: str = "finetune.model") -> None:
        check_choice(f"{prefix}.kind", self.kind, ("wavlm_mhfa", "ecapa"))
        check_choice(f"{prefix}.trainable", self.trainable, ("layers", "all_but_cnn"))
        check_choice(f"{prefix}.ecapa_init", self.ecapa_init, ("dino", "scratch"))
        if self.kind == "wavlm_mhfa" and not (self.pretrained or self.tiny):
            raise ConfigError(f"{prefix}: wavlm_mhfa needs `pretrained` (hub id or folder) or `tiny` sizes")


def build_round_encoder(m: RoundModelConfig, pretrained: str | None = None, init: str | None = None) -> nn.Module:
    """The model to train: an init checkpoint, pre-trained WavLM + MHFA, or ECAPA from scratch.

    A WavLM round model trains only what ``m.trainable`` names, however it was built: its
    own time masking is off (crops are augmented in the data pipeline) and the mask
    embedding, which would get no gradient and stall DDP, never trains.
    """
    if init:
        from raysv.models import load_encoder

        encoder, _ = load_encoder(init)
        encoder.train()
    elif m.kind == "wavlm_mhfa":
        from raysv.models.wavlm_mhfa import load_wavlm_mhfa

        source = pretrained or m.pretrained
        if not source:
            raise ValueError("finetune.model.kind is wavlm_mhfa but no pre-trained WavLM was given")
        encoder = load_wavlm_mhfa(source, m.heads, m.compression, m.embed_dim, m.grad_mult)
    else:
        return ECAPAEncoder.from_config(m.ecapa)
    backbone = getattr(encoder, "backbone", None)
    if backbone is not None:
        freeze_wavlm(backbone, m.trainable)
    return encoder


def freeze_wavlm(backbone: nn.Module, trainable: str = "layers") -> None:
    """Leave trainable only the transformer layers (``layers``) or everything after the CNN (``all_but_cnn``)."""
    backbone.config.apply_spec_augment = False  # crops are augmented in the data pipeline
    keep = {id(p) for p in backbone.encoder.layers.parameters()} if trainable == "layers" else None
    for name, p in backbone.named_parameters():
        if name.startswith("feature_extractor") or name == "masked_spec_embed":
            p.requires_grad_(False)
        elif keep is not None:
            p.requires_grad_(id(p) in keep)


def backbone_parameters(encoder: nn.Module, from_checkpoint: bool = False) -> list[nn.Parameter]:
    """The pre-trained part, which gets its own small learning rate and the L2-SP pull.

    WavLM's transformer; or a whole ECAPA-TDNN started from a checkpoint (the DINO encoder,
    a previous round), whose every layer is pre-trained. An ECAPA from scratch has none:
    all of it trains at the back-end rate.
    """
    backbone = getattr(encoder, "backbone", None)
    if backbone is None and from_checkpoint:
        backbone = encoder
    if backbone is None:
        return []
    return [p for p in backbone.parameters() if p.requires_grad]


def split_parameters(
    model: nn.Module, encoder: nn.Module, from_checkpoint: bool = False
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pre-trained backbone, everything else trainable) of ``model``, for two learning rates."""
    backbone = backbone_parameters(encoder, from_checkpoint)
    ids = {id(p) for p in backbone}
    return backbone, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
