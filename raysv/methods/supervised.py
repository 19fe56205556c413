"""Supervised fine-tuning on (pseudo-)labels: AAM-softmax, L2-SP, loss gate, label correction.

Pseudo-labels are noisy. Samples the model finds hard are likely mislabelled:
from ``loss_gate.start_epoch`` a two-component Gaussian mixture on the previous
epoch's per-sample losses separates "clean" from "noisy", and samples past the
crossing point are left out of the loss. From ``label_correction.start_epoch``
a dropped sample whose clean crop is confidently predicted as another class
(softmax of cosine / T above a threshold) takes that class from then on; the
corrected labels are saved with the checkpoint and become the next stage's labels.
The same method on true labels is the supervised upper bound.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysv.artifacts.checkpoint import TRAINING_FILE, load_training_state
from raysv.artifacts.labels import read_labels
from raysv.config import check_choice, check_non_negative, check_positive
from raysv.methods.base import LrConfig, Method, Wrap, all_reduce_sum, autocast, unwrap
from raysv.models.heads import AAMSoftmax, margin_at
from raysv.models.round_model import RoundModelConfig, build_round_encoder, split_parameters

log = logging.getLogger("raysv.train")


@dataclass
class MarginLossConfig:
    margin: float = 0.2
    scale: float = 30.0
    margin_warmup_epochs: float = 0.0


@dataclass
class LossGateConfig:
    enabled: bool = True
    start_epoch: int = 5


@dataclass
class LabelCorrectionConfig:
    enabled: bool = True
    start_epoch: int = 9
    temperature: float = 0.1
    threshold: float = 0.5


@dataclass
class FinetuneConfig:
    """``finetune``: the round model trained with AAM-softmax on (pseudo-)labels."""

    model: RoundModelConfig = field(default_factory=RoundModelConfig)
    loss: MarginLossConfig = field(default_factory=MarginLossConfig)
    lr: LrConfig = field(default_factory=LrConfig)
    loss_gate: LossGateConfig = field(default_factory=LossGateConfig)
    label_correction: LabelCorrectionConfig = field(default_factory=LabelCorrectionConfig)
    epochs: int = 15
    batch_size: int = 120
    crop_seconds: float = 3.0
    l2sp: float = 0.01
    clip_grad: float = 5.0
    init: str = "pretrained"  # pretrained | previous (start round r from round r-1's model)

    def validate(self, prefix: str = "finetune") -> None:
        self.model.validate(f"{prefix}.model")
        check_choice(f"{prefix}.init", self.init, ("pretrained", "previous"))
        check_positive(f"{prefix}.epochs", self.epochs)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        check_positive(f"{prefix}.crop_seconds", self.crop_seconds)
        check_non_negative(f"{prefix}.lr.backbone_warmup_epochs", self.lr.backbone_warmup_epochs)


@dataclass
class LmftConfig:
    """``lmft``: the last, large-margin fine-tune: longer crops, a larger margin, a few epochs."""

    enabled: bool = True
    crop_seconds: float = 6.0
    margin: float = 0.5
    epochs: int = 5
    lr_scale: float = 0.5

    def finetune_section(self, f: FinetuneConfig) -> FinetuneConfig:
        """The fine-tune settings of the large-margin stage: ``f`` with this section's changes, no warm-ups."""
        return dataclasses.replace(
            f,
            epochs=self.epochs,
            crop_seconds=self.crop_seconds,
            loss=dataclasses.replace(f.loss, margin=self.margin, margin_warmup_epochs=0.0),
            lr=dataclasses.replace(f.lr, backbone=f.lr.backbone * self.lr_scale, head=f.lr.head * self.lr_scale,
                                   backbone_warmup_epochs=0.0),
        )


def gmm_crossing(losses: np.ndarray, seed: int = 0) -> float | None:
    """Loss value where a 2-component GMM's weighted densities cross between the two means.

    Returns None when the losses are not bimodal: the fitted mixture density has no
    dip between the two means (a unimodal sample split into two overlapping
    components), no crossing between the means (one component dominates
    everywhere), too few samples, or degenerate spread.
    """
    from sklearn.mixture import GaussianMixture

    x = np.asarray(losses, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 10 or np.ptp(x) <= 1e-12:
        return None
    gmm = GaussianMixture(2, random_state=seed, reg_covar=1e-6).fit(x.reshape(-1, 1))
    means = gmm.means_.ravel()
    lo, hi = np.sort(means)
    if hi - lo <= 1e-9:
        return None
    grid = np.linspace(lo, hi, 2001).reshape(-1, 1)
    # Every mode of a two-Gaussian mixture lies between its means: bimodal iff the density dips there.
    density = np.exp(gmm.score_samples(grid))
    rim = np.minimum(np.maximum.accumulate(density), np.maximum.accumulate(density[::-1])[::-1])
    if not np.any(density < rim * (1.0 - 1e-6)):
        return None
    post = gmm.predict_proba(grid)[:, int(np.argmax(means))]  # P(high-loss component | x)
    above = np.nonzero(post >= 0.5)[0]
    if above.size == 0 or above[0] == 0:
        return None  # the high-loss component wins everywhere or nowhere between the means
    i = int(above[0])
    p0, p1 = post[i - 1], post[i]
    t = (0.5 - p0) / (p1 - p0) if p1 != p0 else 0.0
    return float(grid[i - 1, 0] + t * (grid[i, 0] - grid[i - 1, 0]))


def correct_labels(cosine: torch.Tensor, temperature: float, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sharpened prediction ``softmax(cos / T)``: (predicted class, whether its probability passes)."""
    probs = torch.softmax(cosine.float() / temperature, dim=-1)
    confidence, predicted = probs.max(dim=-1)
    return predicted, confidence > threshold


class EncoderWithClassifier(nn.Module):
    """One module for DDP: the encoder and the AAM classifier train together."""

    def __init__(self, encoder: nn.Module, classifier: AAMSoftmax):
        super().__init__()
        self.encoder = encoder
        self.classifier = classifier

    def forward(self, wave: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(self.encoder(wave), labels, margin)


class SupervisedMethod(Method):
    name = "supervised"
    config_class = FinetuneConfig

    def __init__(
        self,
        cfg: FinetuneConfig,
        seed: int,
        steps_per_epoch: int,
        labels: str,
        init: str | None = None,
        init_classifier: bool = False,
        pretrained: str | None = None,
    ):
        self.cfg = cfg
        self.seed = seed
        self.epochs = cfg.epochs
        self.batch_size = cfg.batch_size
        self.margin = cfg.loss.margin
        self.warmup = cfg.loss.margin_warmup_epochs
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.init = init
        self.init_classifier = init_classifier
        self.pretrained = pretrained or cfg.model.pretrained
        utt_index, values = read_labels(labels)
        size = int(utt_index.max()) + 1
        table = np.full(size, -1, dtype=np.int64)
        table[utt_index] = values
        self.labels = torch.from_numpy(table)
        self.num_classes = int(values.max()) + 1
        self.prev_losses = torch.full((size,), float("nan"))
        self.epoch = 0
        self.step_in_epoch = 0
        self.gate_threshold: float | None = None

    # -- model
    def build_encoder(self) -> nn.Module:
        """The round model: an init checkpoint, pre-trained WavLM + MHFA, or ECAPA from scratch."""
        return build_round_encoder(self.cfg.model, self.pretrained, self.init)

    def setup(self, device: torch.device, wrap: Wrap) -> None:
        f = self.cfg
        torch.manual_seed(self.seed)
        encoder = self.build_encoder()
        classifier = AAMSoftmax(encoder.embed_dim, self.num_classes, self.margin, f.loss.scale)
        if self.init and self.init_classifier:
            # Only the large-margin stage keeps its source's labels; a new round's cluster
            # ids are unrelated to the previous round's, so its classifier starts afresh.
            self._load_init_classifier(classifier)
        self.device = device
        self.model = wrap(EncoderWithClassifier(encoder, classifier))
        bare = unwrap(self.model)
        backbone_params, head_params = split_parameters(bare, bare.encoder, from_checkpoint=self.init is not None)
        self.base_lrs = [f.lr.backbone, f.lr.head]
        self.optimizer = torch.optim.AdamW(
            [{"params": backbone_params, "lr": self.base_lrs[0]}, {"params": head_params, "lr": self.base_lrs[1]}],
            weight_decay=f.lr.weight_decay,
        )
        self.backbone_params = backbone_params
        self.reference = [p.detach().clone() for p in backbone_params]
        self.labels = self.labels.to(device)
        self.prev_losses = self.prev_losses.to(device)

    def _load_init_classifier(self, classifier: AAMSoftmax) -> None:
        """Large-margin fine-tuning continues with the classifier of the checkpoint it starts from."""
        if not (Path(self.init) / TRAINING_FILE).is_file():
            return
        state = load_training_state(self.init).get("method", {})
        weight = state.get("model", {}).get("classifier.weight")
        if weight is not None and tuple(weight.shape) == tuple(classifier.weight.shape):
            classifier.weight.data.copy_(weight)

    # -- schedule and regularisers
    def l2sp(self) -> torch.Tensor:
        """Squared distance of the backbone from its starting (pre-trained) weights."""
        total = torch.zeros((), device=self.device)
        for p, p0 in zip(self.backbone_params, self.reference):
            total = total + (p - p0).pow(2).sum()
        return total

    def backbone_lr(self, progress: float) -> float:
        """Backbone rate at ``progress`` epochs: per-epoch decay times the linear warm-up ramp."""
        warmup = self.cfg.lr.backbone_warmup_epochs
        ramp = min(1.0, progress / warmup) if warmup > 0 else 1.0
        return self.base_lrs[0] * self.cfg.lr.decay ** int(progress) * ramp

    def start_epoch(self, epoch: int) -> dict[str, float]:
        self.epoch = epoch
        self.step_in_epoch = 0
        decay = self.cfg.lr.decay**epoch
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * decay
        self.model.train()
        self.cur_losses = torch.full_like(self.prev_losses, float("nan"))
        self.changes = torch.zeros_like(self.labels)
        self.dropped = 0
        self.corrected = 0
        self.seen = 0
        gate = self.cfg.loss_gate
        self.gate_threshold = None
        if gate.enabled and epoch >= gate.start_epoch:
            self.gate_threshold = gmm_crossing(self.prev_losses.cpu().numpy(), seed=self.seed)
        return {"gate_threshold": self.gate_threshold if self.gate_threshold is not None else float("nan")}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        f = self.cfg
        idx = batch["utt_index"].long()
        labels = self.labels[idx]
        keep = torch.ones_like(idx, dtype=torch.bool)
        if self.gate_threshold is not None:
            prev = self.prev_losses[idx]
            keep = ~(prev > self.gate_threshold)  # unseen (NaN) samples are kept
        lc = f.label_correction
        if lc.enabled and self.epoch >= lc.start_epoch and bool((~keep).any()) and "clean" in batch:
            labels, keep = self._correct(batch["clean"], idx, labels, keep)
        progress = self.epoch + self.step_in_epoch / self.steps_per_epoch
        margin = margin_at(progress, self.margin, self.warmup)
        self.optimizer.param_groups[0]["lr"] = self.backbone_lr(progress)
        with autocast(self.device):
            losses, logits = self.model(batch["wave"], labels, margin)
        losses = losses.float()
        self.cur_losses[idx] = losses.detach()
        n_keep = int(keep.sum())
        # Every worker runs the same graph each step (DDP), even when the gate keeps nothing here.
        loss = (losses * keep).sum() / max(n_keep, 1)
        penalty = self.l2sp() if f.l2sp > 0 and self.backbone_params else torch.zeros((), device=self.device)
        total = loss + f.l2sp * penalty
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at epoch {self.epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(unwrap(self.model).parameters(), f.clip_grad)
        self.optimizer.step()
        self.step_in_epoch += 1
        self.dropped += int((~keep).sum())
        self.seen += int(idx.numel())
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return {
            "loss": loss.item(),
            "l2sp": float(penalty.detach()),
            "accuracy": float(accuracy),
            "margin": margin,
            "lr_backbone": self.optimizer.param_groups[0]["lr"],
            "lr_head": self.optimizer.param_groups[1]["lr"],
            "crops": int(idx.numel()),
        }

    def _correct(
        self, clean: torch.Tensor, idx: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relabel dropped samples whose clean crop is confidently another class; they rejoin the loss."""
        lc = self.cfg.label_correction
        bare = unwrap(self.model)
        dropped = ~keep
        with torch.no_grad(), autocast(self.device):
            was_training = bare.training
            bare.eval()
            cosine = bare.classifier.cosine(bare.encoder(clean[dropped]))
            bare.train(was_training)
        predicted, confident = correct_labels(cosine, lc.temperature, lc.threshold)
        positions = dropped.nonzero().squeeze(1)[confident]
        new = predicted[confident]
        labels = labels.clone()
        labels[positions] = new
        keep = keep.clone()
        keep[positions] = True
        changed = new != self.labels[idx[positions]]
        self.labels[idx[positions]] = new
        self.changes[idx[positions][changed]] = new[changed] + 1
        self.corrected += int(changed.sum())
        return labels, keep

    def end_epoch(self, epoch: int) -> dict[str, float]:
        # Merge what the workers saw: losses and label changes of disjoint utterances.
        seen = ~torch.isnan(self.cur_losses)
        losses = all_reduce_sum(torch.where(seen, self.cur_losses, torch.zeros_like(self.cur_losses)))
        counts = all_reduce_sum(seen.float())
        self.prev_losses = torch.where(counts > 0, losses / counts.clamp(min=1), torch.full_like(losses, float("nan")))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            changes = self.changes.clone()
            torch.distributed.all_reduce(changes, op=torch.distributed.ReduceOp.MAX)
            self.labels = torch.where(changes > 0, changes - 1, self.labels)
        totals = all_reduce_sum(torch.tensor([self.dropped, self.corrected, self.seen], device=self.device).float())
        dropped, corrected, seen_total = (int(v) for v in totals.tolist())
        if self.gate_threshold is not None:
            log.info("epoch %d: loss gate dropped %d of %d samples, %d relabelled", epoch + 1, dropped, seen_total, corrected)
        return {"dropped": dropped, "corrected": corrected, "samples": seen_total}

    # -- saving
    def encoder(self) -> nn.Module:
        return unwrap(self.model).encoder

    def model_info(self) -> dict[str, Any]:
        return {"method": self.name, "num_classes": self.num_classes, "margin": self.margin}

    def final_labels(self) -> tuple[np.ndarray, np.ndarray]:
        labels = self.labels.cpu().numpy()
        index = np.nonzero(labels >= 0)[0]
        return index.astype(np.int64), labels[index].astype(np.int32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "labels": self.labels.cpu(),
            "prev_losses": self.prev_losses.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.labels = state["labels"].to(self.device)
        self.prev_losses = state["prev_losses"].to(self.device)
