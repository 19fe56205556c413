"""The reference's noisy-label rules and objective (wavlm_ssl_sv), each against an independent computation.

- the loss gate: a GMM on the log of last epoch's losses, each step's *current* log-loss held
  against the crossing of the two weighted components;
- label correction: softmax of the classifier's raw logits (a linear layer on the clean crop's
  embedding) over 0.1, kept above 0.5, for that step only;
- the objective: L/L.detach() + 0.01·Σ‖θ−θ₀‖/(Σ‖θ−θ₀‖.detach()+1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

from raysv.artifacts.labels import write_labels
from raysv.methods.noisy_labels import correct_labels, gate_space, gmm_crossing, kept_by_gate
from raysv.methods.supervised import FinetuneConfig, SupervisedMethod, l2sp_distance, normalised_objective


def test_gate_keeps_the_low_log_loss_mode_of_a_bimodal_sample():
    rng = np.random.default_rng(0)
    clean = np.exp(rng.normal(-1.0, 0.4, 800))  # log-losses around -1: learnt samples
    noisy = np.exp(rng.normal(2.0, 0.5, 200))  # around 2: mislabelled ones
    losses = np.concatenate([clean, noisy])
    threshold = gmm_crossing(gate_space(losses, "log"), seed=0)
    # Where 0.8·N(-1, 0.4) and 0.2·N(2, 0.5) cross, by a fine grid of the true densities.
    grid = np.linspace(-1.0, 2.0, 300001)
    expected = grid[np.argmax(0.8 * norm.pdf(grid, -1.0, 0.4) < 0.2 * norm.pdf(grid, 2.0, 0.5))]
    assert threshold == pytest.approx(expected, abs=0.1)
    kept = kept_by_gate(torch.log(torch.from_numpy(losses)), threshold).numpy()
    assert kept[:800].mean() > 0.99 and kept[800:].mean() < 0.02
    # The same sample on a linear scale: the gate would sit elsewhere (the log form is the reference's).
    assert gmm_crossing(losses, seed=0) != pytest.approx(np.exp(threshold), rel=0.05)


def _toy_method(tmp_path, classes: int, cfg: FinetuneConfig, embed_dim: int = 8) -> SupervisedMethod:
    """A SupervisedMethod over a linear 'encoder' of 16-sample waves: the method's own gate, LC and loss."""

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_dim = embed_dim
            self.proj = nn.Linear(16, embed_dim)

        def forward(self, wave):
            return self.proj(wave)

    n = 64
    labels = (np.arange(n) % classes) if classes <= n else np.linspace(0, classes - 1, n).round()
    write_labels(tmp_path, np.arange(n), labels.astype(np.int32))  # classes: max + 1

    class Toy(SupervisedMethod):
        def build_encoder(self):
            return Linear()

    method = Toy(cfg, seed=0, steps_per_epoch=4, labels=str(tmp_path / "labels.parquet"))
    method.setup(torch.device("cpu"), lambda m: m)
    return method


def test_gate_uses_the_current_loss_not_last_epochs(tmp_path):
    cfg = FinetuneConfig()
    cfg.label_correction.enabled = False
    cfg.l2sp = 0.0
    method = _toy_method(tmp_path, 4, cfg)
    batch = {"wave": torch.randn(8, 16), "utt_index": torch.arange(8)}
    method.start_epoch(cfg.loss_gate.start_epoch)
    with torch.no_grad():
        current, _ = method.model(batch["wave"], method.labels[:8], method.margin)
    # Last epoch's losses say "drop the first four"; this step's say otherwise.
    order = torch.argsort(current)
    method.prev_losses[:8] = torch.where(torch.arange(8) < 4, torch.tensor(50.0), torch.tensor(0.01))
    method.gate_threshold = float(torch.log(current[order[5]]))  # keep the 6 lowest current losses
    method.train_step(batch)
    assert method.dropped == 2
    assert method.cur_losses[:8].isfinite().all()


def test_label_correction_at_7500_classes_uses_raw_logits_for_the_step_only(tmp_path):
    """The raw-logit rule passes 0.5 where softmax(cosine / 0.1) over 7,500 classes cannot."""
    classes, dim = 7500, 8
    cfg = FinetuneConfig()
    cfg.l2sp = 0.0
    cfg.label_correction.start_epoch = 0
    method = _toy_method(tmp_path, classes, cfg, embed_dim=dim)
    bare = method.model
    with torch.no_grad():
        bare.encoder.proj.weight.zero_()
        bare.encoder.proj.bias.zero_()
        bare.encoder.proj.weight[:, :dim] = torch.eye(dim) * 3.0  # embedding = 3 × the wave's first 8 samples
    clean = torch.zeros(4, 16)
    clean[:, 0] = 1.0  # embedding (3, 0, …): along class 7's weight below
    weight = bare.classifier.weight.data
    weight.normal_(0, 0.01)
    weight[7] = torch.tensor([1.0] + [0.0] * (dim - 1))
    emb = bare.encoder(clean)
    raw = F.linear(emb, weight)
    cosine = bare.classifier.cosine(emb)
    predicted, confident = correct_labels(raw, 0.1, 0.5)
    assert predicted.tolist() == [7] * 4 and confident.all()  # softmax(3/0.1 against ~0): certain
    assert not correct_labels(cosine, 0.1, 0.5)[1].any()  # cosine 1 against 7,499 others near 0: no

    # In a step: every sample dropped by the gate, each relabelled to 7 for that step only.
    batch = {"wave": torch.randn(4, 16), "clean": clean, "utt_index": torch.arange(4)}
    stored = method.labels.clone()
    method.start_epoch(0)
    method.gate_threshold = -1e9  # the gate drops everything
    stats = method.train_step(batch)
    assert method.dropped == 4 and method.corrected == 4 and np.isfinite(stats["loss"])
    assert torch.equal(method.labels, stored)  # the stored labels are untouched
    assert method.end_epoch(0)["corrected"] == 4


def test_normalised_objective_and_l2sp_have_the_reference_value_and_gradient():
    torch.manual_seed(0)
    theta0 = [torch.randn(3, 4), torch.randn(5)]
    params = [(t + 0.1 * torch.randn_like(t)).requires_grad_() for t in theta0]
    loss = (params[0] ** 2).sum() * 0.3 + params[1].sum()
    penalty = l2sp_distance(params, theta0, squared=False)
    direct = sum(float(torch.sqrt(((p.detach() - p0) ** 2).sum())) for p, p0 in zip(params, theta0))
    assert float(penalty.detach()) == pytest.approx(direct, rel=1e-6)  # Σ of per-tensor norms, unsquared
    total = normalised_objective(loss, penalty, 0.01)
    assert float(total.detach()) == pytest.approx(1.0 + 0.01 * direct / (direct + 1e-5), rel=1e-6)
    total.backward()
    # d/dθ [L/L₀ + λR/(R₀+ε)] = ∇L/L₀ + λ∇R/(R₀+ε), with L₀, R₀ constants (detached).
    with torch.no_grad():
        l0, r0 = float(loss), direct
        for p, p0, grad_l in zip(params, theta0, [0.6 * params[0], torch.ones(5)]):
            diff = p - p0
            expected = grad_l / l0 + 0.01 * diff / torch.sqrt((diff ** 2).sum()) / (r0 + 1e-5)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    squared = l2sp_distance(params, theta0, squared=True)
    assert float(squared.detach()) == pytest.approx(sum(float(((p.detach() - p0) ** 2).sum()) for p, p0 in zip(params, theta0)))
