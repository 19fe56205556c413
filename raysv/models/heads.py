"""Training heads on top of an encoder's embedding: the DINO projection head and AAM-softmax.

Neither is part of a saved encoder: they exist only while training a method.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """DINO projection head: MLP → L2 normalise → weight-normalised linear layer with unit row norms.

    The last layer's weight-norm magnitude ``g`` is fixed to 1 (DINO's ``norm_last_layer``),
    so each output is a cosine between the bottleneck vector and a learned prototype; this
    keeps the teacher's sharpened softmax stable early in training. ``g`` is a frozen
    parameter (not a buffer) so the state_dict matches the usual weight-norm layout and an
    EMA teacher updated over ``parameters()`` keeps it at 1.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        out_dim: int = 65536,
        nlayers: int = 3,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(nlayers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        """Truncated-normal init (std 0.02) as in DINO: small outputs keep the early softmax near uniform."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # The prototypes' logits in fp32 under bf16 autocast: bf16 would round them by up to
        # 1/512, 0.05 of a logit after the teacher's temperature of 0.04.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.last_layer(F.normalize(x.float(), dim=-1, p=2))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the last layer, whose gradients the trainer zeroes during epoch 1."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]


def margin_at(epoch_progress: float, margin: float, warmup_epochs: float) -> float:
    """Linear margin warm-up: 0 at the start, ``margin`` once ``epoch_progress`` reaches ``warmup_epochs``.

    A full margin on randomly initialised class weights slows early training; ramping it in
    avoids that. ``epoch_progress`` is fractional epochs done (e.g. 1.5).
    """
    if warmup_epochs <= 0:
        return float(margin)
    return float(margin) * min(1.0, max(0.0, epoch_progress / warmup_epochs))


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace form): target logit ``s·cos(θ + m)``.

    Past ``θ > π − m`` the target logit uses ``cos θ − m·sin m`` instead, which keeps it
    decreasing in θ (``cos(θ + m)`` would turn back up). Cosines are clamped to
    ``[-1 + eps, 1 - eps]`` before the sine so gradients stay finite at θ = 0 and θ = π.
    """

    eps: float = 1e-7

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.margin = margin
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_normal_(self.weight)

    def cosine(self, emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each embedding to each class weight, ``(B, C)``, no margin and no scale.

        Always fp32: bf16 autocast would round the cosines by up to 1/512, 0.06 of a logit at scale 30.
        """
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return F.linear(F.normalize(emb.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))

    def margin_logits(self, emb: torch.Tensor, labels: torch.Tensor, margin: float | None = None) -> torch.Tensor:
        """Scaled logits with the angular margin applied to each sample's target class."""
        m = self.margin if margin is None else float(margin)
        cos = self.cosine(emb).clamp(-1.0 + self.eps, 1.0 - self.eps)
        target_cos = cos.gather(1, labels.view(-1, 1))
        sin = (1.0 - target_cos.pow(2)).clamp(min=self.eps).sqrt()
        with_margin = target_cos * math.cos(m) - sin * math.sin(m)
        beyond = target_cos - m * math.sin(m)
        target_logit = torch.where(target_cos >= math.cos(math.pi - m), with_margin, beyond)
        logits = cos.scatter(1, labels.view(-1, 1), target_logit)
        return self.scale * logits

    def forward(
        self, emb: torch.Tensor, labels: torch.Tensor, margin: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample cross-entropy ``(B,)`` (the loss gate needs each sample's loss) and logits ``(B, C)``.

        ``margin`` overrides ``self.margin`` for this call (a caller-driven warm-up).
        """
        logits = self.margin_logits(emb, labels, margin)
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, logits
