"""DINO's optimisation as sslsv does it: per-tensor gradient clipping and the stepped learning rate."""

from __future__ import annotations

import pytest
import torch

from raysv.methods.dino import DinoConfig, DinoMethod, clip_gradients


def test_per_tensor_clipping_caps_each_tensor_alone():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4, 0.0, 0.0])
    total = clip_gradients([a, b], 3.0, per_tensor=True)
    assert float(total) == pytest.approx((50.0**2 + 0.5**2) ** 0.5)
    assert float(a.grad.norm()) == pytest.approx(3.0, rel=1e-5)  # clipped to 3
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4, 0.0, 0.0]))  # untouched: below 3
    a.grad, b.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4, 0.0, 0.0])
    clip_gradients([a, b], 3.0, per_tensor=False)  # one global norm scales both
    assert float(b.grad.norm()) == pytest.approx(0.5 * 3.0 / (50.0**2 + 0.5**2) ** 0.5, rel=1e-4)


def test_step_schedule_is_0_95_every_5_epochs_without_warm_up():
    cfg = DinoConfig(epochs=80)
    method = DinoMethod(cfg, seed=0, steps_per_epoch=10)
    assert method.lr_at(0) == pytest.approx(0.2)
    assert method.lr_at(49) == pytest.approx(0.2)  # epoch 4
    assert method.lr_at(50) == pytest.approx(0.2 * 0.95)  # epoch 5
    assert method.lr_at(799) == pytest.approx(0.2 * 0.95**15)
    cfg.optim.schedule = "warmup_cosine"
    assert DinoMethod(cfg, seed=0, steps_per_epoch=10).lr_at(0) == pytest.approx(0.0)
