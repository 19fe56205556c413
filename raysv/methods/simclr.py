"""SimCLR / additive-margin NT-Xent on crops of the same utterance: the end-to-end baseline.

No labels and no clustering: the round model (WavLM + MHFA, or ECAPA) is trained so
that V independently cropped and augmented views of one utterance embed close together
and views of different utterances apart (Chen et al. 2020; the additive margin on the
positive cosine as in AM-Softmax, Lepage & Dehak 2023). This is the comparison point
the pseudo-label rounds improve on.

Negatives come from the whole global batch: each worker's embeddings are all-gathered
with ``gather_with_grad`` so that gradients reach every worker's own crops, and every
worker computes the same loss over the gathered batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raysv.config import ConfigError, build, check_positive
from raysv.methods.base import LrConfig, Method, Wrap, autocast, unwrap
from raysv.models.round_model import RoundModelConfig, build_round_encoder, split_parameters


@dataclass
class SimclrConfig:
    """``simclr``: end-to-end contrastive baseline, V crops per utterance, (AM-)NT-Xent over the global batch."""

    enabled: bool = False  # also train it as a baseline stage of `raysv run`
    views: int = 2
    crop_seconds: float = 3.0
    temperature: float = 0.03
    margin: float = 0.0  # additive margin on the positive cosine (AM-NT-Xent)
    projector: bool = False
    projector_dim: int = 256
    epochs: int = 10
    batch_size: int = 256  # global, split over the workers; negatives gathered from all of them
    lr: LrConfig = field(default_factory=LrConfig)  # backbone / back-end rates, per-epoch decay
    warmup_epochs: float = 0.0
    clip_grad: float = 5.0

    def validate(self, prefix: str = "simclr") -> None:
        check_positive(f"{prefix}.epochs", self.epochs)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        check_positive(f"{prefix}.crop_seconds", self.crop_seconds)
        check_positive(f"{prefix}.temperature", self.temperature)
        if self.views < 2:
            raise ConfigError(f"{prefix}.views: a contrastive loss needs at least 2 views per utterance, got {self.views}")
        if self.batch_size < 2:
            raise ConfigError(f"{prefix}.batch_size: needs at least 2 utterances per batch for negatives, got {self.batch_size}")


# ---------------------------------------------------------------- loss


def nt_xent(z: torch.Tensor, temperature: float, margin: float = 0.0) -> torch.Tensor:
    """Mean (AM-)NT-Xent over every ordered (anchor, positive) pair of views.

    ``z``: (N, V, D) embeddings, V views of each of N utterances. Each view is an anchor;
    each other view of its utterance is a positive, scored ``(cos - margin) / temperature``;
    the negatives are all views of the other utterances, scored ``cos / temperature``.
    Other positives of the same anchor are left out of the denominator, so with V = 2 this
    is exactly SimCLR's loss. Computed in float32 whatever the input precision.
    """
    if z.dim() != 3:
        raise ValueError(f"nt_xent expects (utterances, views, dim), got shape {tuple(z.shape)}")
    n, v, _ = z.shape
    if v < 2:
        raise ValueError("nt_xent needs at least 2 views per utterance")
    flat = F.normalize(z.float(), dim=-1).reshape(n * v, -1)
    cos = flat @ flat.t()
    utt = torch.arange(n, device=z.device).repeat_interleave(v)
    same = utt[:, None] == utt[None, :]
    positive = same & ~torch.eye(n * v, dtype=torch.bool, device=z.device)
    neg_logits = (cos / temperature).masked_fill(same, float("-inf"))
    neg_lse = torch.logsumexp(neg_logits, dim=1, keepdim=True)  # -inf when there is one utterance
    pos_logits = (cos - margin) / temperature
    # -log softmax of the positive against {itself} ∪ negatives, for every positive pair.
    pair_loss = torch.logaddexp(pos_logits, neg_lse) - pos_logits
    return pair_loss[positive].mean()


def positive_accuracy(z: torch.Tensor) -> torch.Tensor:
    """Share of views whose nearest other view (cosine) belongs to the same utterance."""
    n, v, _ = z.shape
    flat = F.normalize(z.detach().float(), dim=-1).reshape(n * v, -1)
    cos = (flat @ flat.t()).fill_diagonal_(float("-inf"))
    utt = torch.arange(n, device=z.device).repeat_interleave(v)
    return (utt[cos.argmax(dim=1)] == utt).float().mean()


# ---------------------------------------------------------------- distributed


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (worker order); the backward pass returns each worker's slice.

    Every worker computes the same loss L over the gathered batch, so worker k's local
    autograd yields dL/dZ for the whole batch. Summing those over the W workers gives
    W · dL/dz_k for its own slice z_k; DDP then averages the parameter gradients over the
    W workers, which cancels the factor W: the result equals the gradient of one worker
    holding the whole batch, with no rescaling of the loss. (The sum also makes the
    gradient right when workers compute different losses, e.g. only over their own
    anchors, with a global loss equal to the mean of theirs.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        world, rank = dist.get_world_size(), dist.get_rank()
        size = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes_t = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes_t, size)
        sizes = [int(s.item()) for s in sizes_t]
        # all_gather needs equal shapes: pad to the largest slice, then cut the padding off.
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.start = sum(sizes[:rank])
        ctx.size = x.shape[0]
        return torch.cat([part[:s] for part, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.size]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every DDP worker along dim 0, gradients flowing back to each own slice.

    Identity when not distributed. Slices may differ in length between workers.
    """
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


# ---------------------------------------------------------------- model


class Projector(nn.Module):
    """SimCLR's MLP projection head (Linear-BN-ReLU-Linear); the encoder below it is what is kept."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderWithProjector(nn.Module):
    """One module for DDP: the encoder, then the projector (identity when off)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.projector = projector if projector is not None else nn.Identity()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(wave))


# ---------------------------------------------------------------- method


class SimclrMethod(Method):
    """Contrastive training of the round model on V crops per utterance (``batch["views"]``)."""

    name = "simclr"
    config_class = SimclrConfig

    def __init__(
        self,
        cfg: SimclrConfig,
        seed: int,
        steps_per_epoch: int,
        model: dict[str, Any],
        pretrained: str | None = None,
        init: str | None = None,
    ):
        self.cfg = cfg
        self.seed = seed
        self.model_cfg = build(RoundModelConfig, model, "finetune.model")
        s = cfg
        self.epochs = s.epochs
        self.batch_size = s.batch_size
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.pretrained = pretrained
        self.init = init
        self.step = 0
        self.epoch = 0

    def setup(self, device: torch.device, wrap: Wrap) -> None:
        s = self.cfg
        torch.manual_seed(self.seed)
        encoder = build_round_encoder(self.model_cfg, self.pretrained, self.init)
        projector = Projector(encoder.embed_dim, s.projector_dim, s.projector_dim) if s.projector else None
        self.device = device
        self.model = wrap(EncoderWithProjector(encoder, projector))
        bare = unwrap(self.model)
        backbone, head = split_parameters(bare, bare.encoder, from_checkpoint=self.init is not None)
        self.base_lrs = [s.lr.backbone, s.lr.head]
        self.optimizer = torch.optim.AdamW(
            [{"params": backbone, "lr": s.lr.backbone}, {"params": head, "lr": s.lr.head}],
            weight_decay=s.lr.weight_decay,
        )

    def lr_factor(self, step: int, epoch: int) -> float:
        """Linear warm-up over ``warmup_epochs``, times ``lr.decay`` per finished epoch."""
        s = self.cfg
        warmup = s.warmup_epochs * self.steps_per_epoch
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        return ramp * s.lr.decay**epoch

    def start_epoch(self, epoch: int) -> dict[str, float]:
        self.epoch = epoch
        self.model.train()
        return {}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        s = self.cfg
        factor = self.lr_factor(self.step, self.epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        views = batch["views"]
        b, v, samples = views.shape
        with autocast(self.device, self.bf16):
            z = self.model(views.reshape(b * v, samples))
        z = gather_with_grad(z.float().reshape(b, v, -1))
        loss = nt_xent(z, s.temperature, s.margin)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SimCLR loss is {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(self.model).parameters(), s.clip_grad)
        self.optimizer.step()
        self.step += 1
        return {
            "loss": loss.item(),
            "accuracy": float(positive_accuracy(z)),
            "grad_norm": float(grad_norm),
            "lr_backbone": self.optimizer.param_groups[0]["lr"],
            "lr_head": self.optimizer.param_groups[1]["lr"],
            "crops": b * v,
        }

    def encoder(self) -> nn.Module:
        return unwrap(self.model).encoder

    def model_info(self) -> dict[str, Any]:
        s = self.cfg
        return {"method": self.name, "temperature": s.temperature, "margin": s.margin}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))
