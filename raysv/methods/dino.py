"""DINO self-distillation (Caron et al. 2021) for speaker embeddings, as in round 0.

The student sees every crop, the teacher (an EMA of the student) only the global
ones; the loss is the cross-entropy between the centred, sharpened teacher output
and the student output over all pairs of different views. The embedding model
kept afterwards is the teacher's backbone. The teacher runs in train mode and keeps
its own BatchNorm statistics: the student's would belong to other weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from raysv.config import ConfigError, check_choice, check_non_negative, check_positive
from raysv.methods.base import Method, Wrap, all_reduce_mean, autocast, cosine_schedule, unwrap
from raysv.models.ecapa import ECAPAEncoder, EcapaConfig
from raysv.models.heads import DINOHead


@dataclass
class CropConfig:
    global_count: int = 2
    global_seconds: float = 4.0
    local_count: int = 4
    local_seconds: float = 2.0


@dataclass
class DinoHeadConfig:
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 65536


@dataclass
class SgdConfig:
    """SGD with momentum; ``schedule`` step: lr × decay^(epoch // decay_every) (sslsv's default at 9a9bf49),
    warmup_cosine: a linear warm-up over ``warmup_epochs``, then cosine down to ``min_lr``."""

    lr: float = 0.2
    schedule: str = "step"  # step | warmup_cosine
    decay: float = 0.95
    decay_every: int = 5
    min_lr: float = 5e-5
    weight_decay: float = 5e-5
    momentum: float = 0.9
    warmup_epochs: int = 10


@dataclass
class DiversityConfig:
    """Weights of the regularisers on the student's embeddings against dimensional collapse (0: off)."""

    variance: float = 0.0  # hinge on each dimension's batch standard deviation (below 1)
    covariance: float = 0.0  # squared off-diagonal covariances: redundant dimensions


@dataclass
class DinoConfig:
    """``dino``: round 0, DINO self-distillation of an ECAPA-TDNN."""

    encoder: EcapaConfig = field(default_factory=lambda: EcapaConfig(embed_dim=512))  # sslsv: a 512-d embedding
    crops: CropConfig = field(default_factory=CropConfig)
    head: DinoHeadConfig = field(default_factory=DinoHeadConfig)
    optim: SgdConfig = field(default_factory=SgdConfig)
    epochs: int = 80
    batch_size: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    freeze_last_layer_epochs: int = 1
    clip_grad: float = 3.0
    clip_per_tensor: bool = True  # each tensor's gradient norm clipped alone (sslsv), else one global norm
    sync_batchnorm: bool = True  # batch statistics over all workers under DDP (GPU only; PyTorch's is CUDA-only)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)

    def validate(self, prefix: str = "dino") -> None:
        check_choice(f"{prefix}.optim.schedule", self.optim.schedule, ("step", "warmup_cosine"))
        check_positive(f"{prefix}.optim.decay_every", self.optim.decay_every)
        check_positive(f"{prefix}.epochs", self.epochs)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        for name in ("variance", "covariance"):
            check_non_negative(f"{prefix}.diversity.{name}", getattr(self.diversity, name))
        if self.crops.global_count < 2:
            raise ConfigError(f"{prefix}.crops.global_count: DINO needs at least 2 global crops")


def dino_views(crops: CropConfig) -> dict[str, tuple[int, float]]:
    """DINO's named crop groups, ``{name: (count, seconds)}``; no ``local`` group when its count is 0."""
    views = {"global": (crops.global_count, crops.global_seconds)}
    if crops.local_count > 0:
        views["local"] = (crops.local_count, crops.local_seconds)
    return views


class EncoderWithHead(nn.Module):
    """Backbone followed by the DINO projection head; views of one length go as one batch."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``views``: tensors (B, V_i, S_i) → (head outputs (B, K), embeddings (B, D)), view by view, in order."""
        outputs, embeddings = [], []
        for group in views:
            b, v, s = group.shape
            emb = self.encoder(group.reshape(b * v, s))
            outputs.extend(self.head(emb).reshape(b, v, -1).unbind(1))
            embeddings.extend(emb.reshape(b, v, -1).unbind(1))
        return outputs, embeddings


def dino_loss(
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean cross-entropy H(teacher_q, student_v) over all pairs q ≠ v.

    Teacher view q is the same crop as student view q (globals come first), so
    pairs of a view with itself are skipped.
    """
    student_logp = [torch.log_softmax(s.float() / student_temp, dim=-1) for s in student_out]
    teacher_p = [torch.softmax((t.float() - center) / teacher_temp, dim=-1).detach() for t in teacher_out]
    total = student_out[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for q, tp in enumerate(teacher_p):
        for v, sl in enumerate(student_logp):
            if v == q:
                continue
            total = total + (-tp * sl).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


def diversity_terms(embeddings: list[torch.Tensor], eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance and covariance regularisers (VICReg form, as in RDINO) over views of a batch.

    Plain DINO on little data lets the embedding collapse onto a few directions: the
    teacher's prototypes need only a handful. The variance term is a hinge that keeps
    each dimension's batch standard deviation at 1 or more; the covariance term is the
    mean squared off-diagonal covariance per dimension, which decorrelates dimensions.
    Both are averaged over the views, each view a (B, D) batch with B ≥ 2.
    """
    variance = embeddings[0].new_zeros((), dtype=torch.float32)
    covariance = variance.clone()
    for emb in embeddings:
        x = emb.float()
        z = x - x.mean(dim=0)
        n, d = z.shape
        variance = variance + torch.relu(1.0 - torch.sqrt(z.var(dim=0) + eps)).mean()
        cov = z.T @ z / (n - 1)
        covariance = covariance + (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d
    return variance / len(embeddings), covariance / len(embeddings)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, per_tensor: bool) -> torch.Tensor:
    """Clip each tensor's gradient to ``max_norm`` (sslsv) or all of them by their global norm; the global norm before."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    grads = [p.grad for p in with_grad]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))
    if not per_tensor:
        torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
        return total
    for g in grads:
        norm = torch.linalg.vector_norm(g.detach())
        scale = max_norm / (norm + 1e-6)
        if scale < 1:
            g.mul_(scale)
    return total


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DinoMethod(Method):
    name = "dino"
    config_class = DinoConfig

    def __init__(self, cfg: DinoConfig, seed: int, steps_per_epoch: int):
        self.cfg = cfg
        self.seed = seed
        d = cfg
        self.epochs = d.epochs
        self.batch_size = d.batch_size
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = self.epochs * self.steps_per_epoch
        self.step = 0
        self.epoch = 0

    def setup(self, device: torch.device, wrap: Wrap) -> None:
        d = self.cfg
        torch.manual_seed(self.seed)
        encoder = ECAPAEncoder.from_config(d.encoder)
        head = DINOHead(encoder.embed_dim, d.head.hidden_dim, d.head.bottleneck_dim, d.head.out_dim)
        student = EncoderWithHead(encoder, head)
        if d.sync_batchnorm and device.type == "cuda" and _world_size() > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.teacher = copy.deepcopy(student).to(device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.device = device
        self.student = wrap(student)
        bare = unwrap(self.student)
        decay = [p for n, p in bare.named_parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for n, p in bare.named_parameters() if p.requires_grad and p.ndim <= 1]
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": d.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=d.optim.lr,
            momentum=d.optim.momentum,
        )
        self.center = torch.zeros(1, d.head.out_dim, device=device)
        self.last_layer = list(bare.head.last_layer_parameters())

    # -- schedules
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        if o.schedule == "step":
            return o.lr * o.decay ** ((step // self.steps_per_epoch) // o.decay_every)
        warmup = min(o.warmup_epochs * self.steps_per_epoch, self.total_steps // 2)
        return cosine_schedule(o.lr, o.min_lr, step, self.total_steps, warmup=warmup)

    def momentum_at(self, step: int) -> float:
        return cosine_schedule(self.cfg.teacher_momentum, 1.0, step, self.total_steps)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        self.epoch = epoch
        self.student.train()
        self.teacher.train()
        return {}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        d = self.cfg
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        views = [batch["global"]] + ([batch["local"]] if "local" in batch else [])
        with autocast(self.device, self.bf16):
            with torch.no_grad():
                teacher_out, _ = self.teacher([batch["global"]])
            student_out, student_emb = self.student(views)
        loss = dino_loss(student_out, teacher_out, self.center, d.student_temp, d.teacher_temp)
        metrics: dict[str, float] = {}
        if d.diversity.variance > 0 or d.diversity.covariance > 0:
            variance, covariance = diversity_terms(student_emb)
            metrics = {"dino_loss": loss.item(), "variance": variance.item(), "covariance": covariance.item()}
            loss = loss + d.diversity.variance * variance + d.diversity.covariance * covariance
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DINO loss is {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(unwrap(self.student).parameters(), d.clip_grad, d.clip_per_tensor)
        if self.epoch < d.freeze_last_layer_epochs:
            for p in self.last_layer:
                p.grad = None
        self.optimizer.step()
        momentum = self.momentum_at(self.step)
        with torch.no_grad():
            for ps, pt in zip(unwrap(self.student).parameters(), self.teacher.parameters()):
                pt.mul_(momentum).add_(ps.detach(), alpha=1.0 - momentum)
            batch_center = all_reduce_mean(torch.cat(teacher_out).float().mean(dim=0, keepdim=True))
            self.center.mul_(d.center_momentum).add_(batch_center, alpha=1.0 - d.center_momentum)
        self.step += 1
        crops = sum(v.shape[0] * v.shape[1] for v in views)
        return {"loss": loss.item(), "lr": lr, "teacher_momentum": momentum, "grad_norm": float(grad_norm),
                "crops": crops, **metrics}

    def encoder(self) -> nn.Module:
        return self.teacher.encoder

    def model_info(self) -> dict[str, Any]:
        e = self.cfg.encoder
        return {"method": self.name, "features": f"fbank{e.n_mels}-{e.norm}"}

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": unwrap(self.student).state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.center.cpu(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.student).load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.center.copy_(state["center"].to(self.center.device))
        self.step = int(state["step"])
