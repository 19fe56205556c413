"""``ray.precision``: which devices train under bf16 autocast, and the parts that stay fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysv import runtime
from raysv.config import ConfigError
from raysv.models.heads import AAMSoftmax, DINOHead
from raysv.runtime import RayConfig, use_bf16


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_takes_bf16_on_gpus_and_on_cpus_with_bf16_instructions(monkeypatch, has_bf16):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert use_bf16("auto", "cpu") is has_bf16
    assert use_bf16("auto", "cuda") is True
    assert use_bf16("fp32", "cuda") is False
    assert use_bf16("bf16", "cpu") is True


def test_a_bad_precision_is_named():
    with pytest.raises(ConfigError, match=r"ray\.precision.*'fp16'"):
        RayConfig(precision="fp16").validate()
    with pytest.raises(ValueError, match="'half'"):
        use_bf16("half", "cpu")


def test_heads_score_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    aam = AAMSoftmax(16, 5, margin=0.2, scale=30.0)
    head = DINOHead(16, 32, 8, 24)
    emb = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosine = aam.cosine(emb.bfloat16())
        out = head(emb)
    assert cosine.dtype == torch.float32 and out.dtype == torch.float32
    # The cosines of the bf16 embeddings, computed independently in float64.
    e = emb.bfloat16().double().numpy()
    w = aam.weight.detach().double().numpy()
    expected = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosine.detach().numpy(), expected, atol=1e-6)
