"""Supervised fine-tuning on (pseudo-)labels: AAM-softmax, L2-SP, loss gate, label correction.

Pseudo-labels are noisy (:mod:`raysv.methods.noisy_labels`): from ``loss_gate.start_epoch``
a sample whose loss lies past the crossing of a two-component mixture fitted to last
epoch's log-losses is left out of the step; from ``label_correction.start_epoch`` such a
sample is trained, for that step, on the class its clean crop is confidently predicted as
(softmax of the classifier's raw logits / T above a threshold). As in wavlm_ssl_sv the step
minimises ``L/L.detach() + λ·R/(R.detach() + 1e-5)``, R the sum over the backbone's tensors of
‖θ − θ₀‖ with θ₀ the pre-trained weights. The same method on true labels, gate and
correction off, is the supervised reference.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysv.artifacts.checkpoint import TRAINING_FILE, load_training_state, load_weights, read_model_json
from raysv.config import ConfigError, check_choice, check_non_negative, check_positive
from raysv.data.sampling import UniqueClassBatches, epoch_selection
from raysv.methods.base import LrConfig, Method, Wrap, all_reduce_sum, autocast, unwrap
from raysv.methods.noisy_labels import correct_labels, gate_space, gmm_crossing, kept_by_gate
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
    """Epochs are 0-based: the reference gates from its (1-based) epoch 5, here 4."""

    enabled: bool = True
    start_epoch: int = 4
    space: str = "log"  # log | linear: the scale of the losses the mixture is fitted to
    compare: str = "current"  # current | previous: the loss held against the threshold, this step's or last epoch's


@dataclass
class LabelCorrectionConfig:
    """Epochs are 0-based: the reference corrects after its (1-based) epoch 8, here from 8."""

    enabled: bool = True
    start_epoch: int = 8
    temperature: float = 0.1
    threshold: float = 0.5
    logits: str = "raw"  # raw (the classifier's linear layer, as the reference) | cosine
    persist: bool = False  # keep corrected labels for later epochs and the next stage (else: this step only)


@dataclass
class SamplerConfig:
    """Per worker batch: no class twice; per epoch: at most ``max_per_class`` utterances of a class."""

    unique_classes: bool = True
    max_per_class: int | None = 500


@dataclass
class FinetuneConfig:
    """``finetune``: the round model trained with AAM-softmax on (pseudo-)labels."""

    model: RoundModelConfig = field(default_factory=RoundModelConfig)
    loss: MarginLossConfig = field(default_factory=MarginLossConfig)
    lr: LrConfig = field(default_factory=LrConfig)
    loss_gate: LossGateConfig = field(default_factory=LossGateConfig)
    label_correction: LabelCorrectionConfig = field(default_factory=LabelCorrectionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    epochs: int = 15
    batch_size: int = 240  # global, split over the workers
    crop_seconds: float = 3.0
    # normalised: L/L.detach() + l2sp·R/(R.detach()+1e-5), R = Σ‖θ−θ₀‖ (the reference);
    # plain: L + l2sp·Σ‖θ−θ₀‖².
    objective: str = "normalised"
    l2sp: float = 0.01
    l2sp_anchor: str = "pretrained"  # pretrained (WavLM, or the DINO encoder) | start (the stage's first weights)
    clip_grad: float | None = None  # global gradient-norm clip (the reference does not clip)
    init: str = "pretrained"  # pretrained | previous (start round r from round r-1's model)

    def validate(self, prefix: str = "finetune") -> None:
        self.model.validate(f"{prefix}.model")
        check_choice(f"{prefix}.init", self.init, ("pretrained", "previous"))
        check_choice(f"{prefix}.objective", self.objective, ("normalised", "plain"))
        check_choice(f"{prefix}.l2sp_anchor", self.l2sp_anchor, ("pretrained", "start"))
        check_choice(f"{prefix}.loss_gate.space", self.loss_gate.space, ("log", "linear"))
        check_choice(f"{prefix}.loss_gate.compare", self.loss_gate.compare, ("current", "previous"))
        check_choice(f"{prefix}.label_correction.logits", self.label_correction.logits, ("raw", "cosine"))
        check_positive(f"{prefix}.epochs", self.epochs)
        check_positive(f"{prefix}.batch_size", self.batch_size)
        check_positive(f"{prefix}.crop_seconds", self.crop_seconds)
        check_positive(f"{prefix}.sampler.max_per_class", self.sampler.max_per_class)
        check_positive(f"{prefix}.clip_grad", self.clip_grad)
        check_non_negative(f"{prefix}.l2sp", self.l2sp)
        check_non_negative(f"{prefix}.lr.backbone_warmup_epochs", self.lr.backbone_warmup_epochs)


@dataclass
class LmftConfig:
    """``lmft``: the last, large-margin fine-tune: longer crops, a larger margin, a few epochs."""

    enabled: bool = True
    crop_seconds: float = 6.0
    margin: float = 0.5
    epochs: int = 5
    lr_scale: float = 1.0  # the reference keeps the rounds' rates
    batch_size: int | None = 100  # global; null: the rounds' batch size
    label_correction: bool = False  # the reference's correction starts after the stage has ended
    # The model kept is (1 - w)·end + w·start, the stage's start its round's model (WiSE-FT); 0: the end.
    start_weight: float = 0.0

    def validate(self, prefix: str = "lmft") -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be positive, got {self.batch_size}")
        if not 0.0 <= self.start_weight < 1.0:
            raise ConfigError(f"{prefix}.start_weight: must be in [0, 1), got {self.start_weight}")

    def finetune_section(self, f: FinetuneConfig) -> FinetuneConfig:
        """The fine-tune settings of the large-margin stage: ``f`` with this section's changes, no warm-ups."""
        self.validate()
        return dataclasses.replace(
            f,
            epochs=self.epochs,
            crop_seconds=self.crop_seconds,
            batch_size=self.batch_size or f.batch_size,
            loss=dataclasses.replace(f.loss, margin=self.margin, margin_warmup_epochs=0.0),
            lr=dataclasses.replace(f.lr, backbone=f.lr.backbone * self.lr_scale, head=f.lr.head * self.lr_scale,
                                   backbone_warmup_epochs=0.0),
            label_correction=dataclasses.replace(f.label_correction,
                                                 enabled=f.label_correction.enabled and self.label_correction),
        )


# ---------------------------------------------------------------- objective


def l2sp_distance(params: list[torch.Tensor], anchors: list[torch.Tensor], squared: bool) -> torch.Tensor:
    """Σ over tensors of ‖θ − θ₀‖ (the reference) or of ‖θ − θ₀‖² (``squared``)."""
    if not params:
        return torch.zeros(())
    terms = [(p - p0).pow(2).sum() if squared else torch.linalg.vector_norm(p - p0) for p, p0 in zip(params, anchors)]
    return torch.stack(terms).sum()


def normalised_objective(loss: torch.Tensor, penalty: torch.Tensor, weight: float) -> torch.Tensor:
    """``L/L.detach() + weight·R/(R.detach() + 1e-5)``: each term's gradient is scaled to unit size."""
    total = loss / loss.detach().clamp_min(1e-12)
    if weight > 0:
        total = total + weight * penalty / (penalty.detach() + 1e-5)
    return total


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
    custom_batches = True

    def __init__(
        self,
        cfg: FinetuneConfig,
        seed: int,
        steps_per_epoch: int,
        labels: str,
        init: str | None = None,
        init_classifier: bool = False,
        pretrained: str | None = None,
        anchor: str | None = None,
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
        self.anchor = anchor  # the L2-SP θ₀: a WavLM (hub id or folder) or a raysv checkpoint; None: the start
        from raysv.artifacts.labels import read_labels  # pyarrow: only where labels are read

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
        self.reference = self._anchor_weights(bare.encoder, backbone_params)
        self.labels = self.labels.to(device)
        self.prev_losses = self.prev_losses.to(device)

    def _anchor_weights(self, encoder: nn.Module, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """θ₀ of each backbone parameter: from ``anchor`` (by name) when given, else the starting weights."""
        start = [p.detach().clone() for p in params]
        starts_at_anchor = self.anchor == self.init or (self.init is None and self.anchor == self.pretrained)
        if not params or not self.anchor or self.cfg.l2sp_anchor == "start" or starts_at_anchor:
            return start
        names = {id(p): n for n, p in encoder.named_parameters()}
        if (Path(self.anchor) / "model.json").is_file():
            read_model_json(self.anchor)
            state = load_weights(self.anchor)  # a raysv checkpoint: the encoder's own names
        else:
            from transformers import WavLMModel

            state = {f"backbone.{k}": v for k, v in WavLMModel.from_pretrained(str(self.anchor)).state_dict().items()}
        out = []
        for p, p0 in zip(params, start):
            value = state.get(names[id(p)])
            out.append(value.to(p0.device, p0.dtype) if value is not None and value.shape == p0.shape else p0)
        return out

    def _load_init_classifier(self, classifier: AAMSoftmax) -> None:
        """Large-margin fine-tuning continues with the classifier of the checkpoint it starts from."""
        if not (Path(self.init) / TRAINING_FILE).is_file():
            return
        state = load_training_state(self.init).get("method", {})
        weight = state.get("model", {}).get("classifier.weight")
        if weight is not None and tuple(weight.shape) == tuple(classifier.weight.shape):
            classifier.weight.data.copy_(weight)

    # -- batches
    def rebatch(
        self, batches: Iterable[dict[str, np.ndarray]], epoch: int, batch_size: int
    ) -> Iterator[dict[str, np.ndarray]]:
        """This worker's batches: rows of this epoch's per-class selection, no class twice in a batch."""
        s = self.cfg.sampler
        labels = self.labels.cpu().numpy()
        selected = epoch_selection(labels, s.max_per_class, self.seed, epoch) if s.max_per_class else None
        keep = (lambda b: selected[np.asarray(b["utt_index"])]) if selected is not None else None
        if s.unique_classes:
            self.batcher = UniqueClassBatches(batch_size)
            yield from self.batcher(batches, lambda b: labels[np.asarray(b["utt_index"])], keep)
            return
        rows: dict[str, list] = {}
        for batch in batches:
            mask = keep(batch) if keep is not None else np.ones(len(batch["utt_index"]), bool)
            for k, v in batch.items():
                rows.setdefault(k, []).extend(np.asarray(v)[mask])
            while len(rows.get("utt_index", [])) >= batch_size:
                yield {k: np.stack(v[:batch_size]) for k, v in rows.items()}
                rows = {k: v[batch_size:] for k, v in rows.items()}

    # -- schedule and regularisers
    def l2sp(self) -> torch.Tensor:
        """Distance of the backbone from θ₀: Σ‖θ−θ₀‖ (normalised objective) or Σ‖θ−θ₀‖² (plain)."""
        if not self.backbone_params:
            return torch.zeros((), device=self.device)
        return l2sp_distance(self.backbone_params, self.reference, squared=self.cfg.objective == "plain")

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
            previous = gate_space(self.prev_losses.cpu().numpy(), gate.space)
            self.gate_threshold = gmm_crossing(previous, seed=self.seed)
        return {"gate_threshold": self.gate_threshold if self.gate_threshold is not None else float("nan")}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        f = self.cfg
        idx = batch["utt_index"].long()
        labels = self.labels[idx]
        progress = self.epoch + self.step_in_epoch / self.steps_per_epoch
        margin = margin_at(progress, self.margin, self.warmup)
        self.optimizer.param_groups[0]["lr"] = self.backbone_lr(progress)
        with autocast(self.device, self.bf16):
            losses, logits = self.model(batch["wave"], labels, margin)
        losses, logits = losses.float(), logits.float()
        self.cur_losses[idx] = losses.detach()
        gate = f.loss_gate
        compared = losses.detach() if gate.compare == "current" else self.prev_losses[idx]
        keep = kept_by_gate(gate_space(compared, gate.space), self.gate_threshold)
        lc = f.label_correction
        dropped = ~keep
        if lc.enabled and self.epoch >= lc.start_epoch and "clean" in batch:
            # The reference: a dropped sample confidently predicted (clean crop) is trained towards
            # that class on this step's logits; the others stay out; the mean is over the batch.
            relabel = torch.zeros_like(keep)
            target = labels
            if bool(dropped.any()):
                predicted, confident = self._predict_clean(batch["clean"][dropped])
                relabel[dropped] = confident
                target = labels.clone()
                target[dropped] = predicted
            corrected_losses = F.cross_entropy(logits, target, reduction="none")
            loss = (losses * keep + corrected_losses * relabel).mean()
            self._record_corrections(idx, labels, target, relabel)
        else:
            # Every worker runs the same graph each step (DDP), even when the gate keeps nothing here.
            loss = (losses * keep).sum() / max(int(keep.sum()), 1)
        penalty = self.l2sp() if f.l2sp > 0 else torch.zeros((), device=self.device)
        if f.objective == "normalised":
            total = normalised_objective(loss, penalty, f.l2sp)
        else:
            total = loss + f.l2sp * penalty
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at epoch {self.epoch}")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if f.clip_grad:
            torch.nn.utils.clip_grad_norm_(unwrap(self.model).parameters(), f.clip_grad)
        self.optimizer.step()
        self.step_in_epoch += 1
        self.dropped += int(dropped.sum())
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

    def _predict_clean(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class, confident) of clean crops: softmax of the raw logits (or cosines) over T, above the threshold."""
        lc = self.cfg.label_correction
        bare = unwrap(self.model)
        with torch.no_grad(), autocast(self.device, self.bf16):
            was_training = bare.training
            bare.eval()
            emb = bare.encoder(clean).float()
            bare.train(was_training)
        if lc.logits == "raw":
            logits = F.linear(emb, bare.classifier.weight.float())
        else:
            logits = bare.classifier.cosine(emb)
        return correct_labels(logits, lc.temperature, lc.threshold)

    def _record_corrections(
        self, idx: torch.Tensor, labels: torch.Tensor, target: torch.Tensor, relabel: torch.Tensor
    ) -> None:
        """Count the relabelled samples; with ``persist`` the label table takes their new class."""
        changed = relabel & (target != labels)
        self.corrected += int(changed.sum())
        if self.cfg.label_correction.persist and bool(changed.any()):
            self.labels[idx[changed]] = target[changed]
            self.changes[idx[changed]] = target[changed] + 1

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
        repeats = getattr(getattr(self, "batcher", None), "repeats", 0)
        totals = all_reduce_sum(torch.tensor([self.dropped, self.corrected, self.seen, repeats],
                                             device=self.device).float())
        dropped, corrected, seen_total, repeats = (int(v) for v in totals.tolist())
        if self.gate_threshold is not None:
            log.info("epoch %d: loss gate dropped %d of %d samples, %d relabelled", epoch + 1, dropped, seen_total, corrected)
        return {"dropped": dropped, "corrected": corrected, "samples": seen_total, "class_repeats": repeats}

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
