"""The WavLM round model: only the transformer layers and the back-end train, however it is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raysv.artifacts.checkpoint import save_model
from raysv.artifacts.labels import write_labels
from raysv.methods.supervised import FinetuneConfig, SupervisedMethod
from raysv.models.round_model import build_round_encoder
from raysv.models.wavlm_mhfa import save_tiny_wavlm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_wavlm(tmp_path_factory.mktemp("wavlm") / "tiny", hidden_size=32, layers=2, heads=2,
                           intermediate=64, conv_dim=16)


def _config(tiny) -> FinetuneConfig:
    cfg = FinetuneConfig()
    m = cfg.model
    m.kind, m.pretrained, m.heads, m.compression, m.embed_dim = "wavlm_mhfa", str(tiny), 2, 8, 16
    cfg.lr.backbone = cfg.lr.head = 1e-2
    return cfg


def _method(cfg, labels, init=None) -> SupervisedMethod:
    method = SupervisedMethod(cfg, seed=0, steps_per_epoch=1, labels=str(labels), init=init)
    method.setup(torch.device("cpu"), lambda m: m)
    method.start_epoch(0)
    return method


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"wave": torch.randn(4, 8000, generator=g), "utt_index": torch.arange(4)}


def test_only_transformer_layers_and_back_end_train(tiny, tmp_path):
    write_labels(tmp_path, np.arange(4), np.array([0, 1, 2, 3], np.int32))
    method = _method(_config(tiny), tmp_path / "labels.parquet")
    backbone = method.encoder().backbone
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not n.startswith("encoder.layers.")}
    assert any(n.startswith("feature_projection") for n in frozen) and "encoder.layer_norm.weight" in frozen
    assert any(n.startswith("encoder.pos_conv_embed") for n in frozen)
    layers = {n: p.detach().clone() for n, p in backbone.named_parameters() if n.startswith("encoder.layers.")}
    optimised = {id(p) for g in method.optimizer.param_groups for p in g["params"]}
    method.train_step(_batch())
    for name, p in backbone.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name  # bit-identical after the step
            assert not p.requires_grad and id(p) not in optimised, name
    assert any(not torch.equal(p, layers[n]) for n, p in backbone.named_parameters() if n in layers)


def test_a_rebuilt_round_model_gives_every_trainable_parameter_a_gradient(tiny, tmp_path):
    """Rebuilt from a checkpoint (large-margin stage, finetune.init: previous), nothing trainable is left unused."""
    write_labels(tmp_path, np.arange(4), np.array([0, 1, 2, 3], np.int32))
    cfg = _config(tiny)
    save_model(tmp_path / "round1", build_round_encoder(cfg.model, str(tiny)))
    rebuilt = build_round_encoder(cfg.model, init=str(tmp_path / "round1"))
    assert not rebuilt.backbone.masked_spec_embed.requires_grad
    method = _method(cfg, tmp_path / "labels.parquet", init=str(tmp_path / "round1"))
    optimised = {id(p) for g in method.optimizer.param_groups for p in g["params"]}
    assert id(method.encoder().backbone.masked_spec_embed) not in optimised
    method.model.train()
    labels = method.labels[:4]
    losses, _ = method.model(_batch()["wave"], labels, 0.2)
    losses.mean().backward()
    missing = [n for n, p in method.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters without a gradient (DDP would stall): {missing}"
