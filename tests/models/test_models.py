"""Encoders and heads: sizes against the published figures, numerics against direct references."""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import torch

from raysv.models import AAMSoftmax, DINOHead, ECAPAEncoder, ECAPATDNN, build_encoder, margin_at
from raysv.models.ecapa import _weighted_mean_std


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def roundtrip_state(module: torch.nn.Module) -> dict:
    """State dict through torch.save / torch.load(weights_only=True), as checkpoints are read."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- ECAPA-TDNN


@pytest.mark.parametrize(
    "channels, mfa, expected",
    [(512, 1536, 6.2e6), (1024, 1536, 14.7e6), (1024, 3072, 20.8e6)],
)
def test_ecapa_parameter_counts_match_published(channels, mfa, expected):
    with torch.device("meta"):
        model = ECAPATDNN(channels=channels, mfa_channels=mfa, embed_dim=192, n_mels=80)
    assert abs(count(model) - expected) / expected < 0.05


def test_ecapa_encoder_waveform_to_embedding():
    torch.manual_seed(0)
    enc = ECAPAEncoder().eval()
    assert enc.embed_dim == 192
    with torch.no_grad():
        assert enc(torch.randn(2, 16000)).shape == (2, 192)
    small = ECAPAEncoder(channels=64, mfa_channels=192, embed_dim=32, n_mels=40)
    with torch.no_grad():
        assert small.eval()(torch.randn(3, 24000)).shape == (3, 32)  # any length
    small.train()
    out = small(torch.randn(4, 16000))
    assert out.shape == (4, 32) and out.dtype == torch.float32
    out.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())


def test_ecapa_embedding_independent_of_batch_companions():
    torch.manual_seed(0)
    enc = ECAPAEncoder(channels=64, mfa_channels=192, embed_dim=32)
    enc.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(2):
            enc(torch.randn(4, 8000) * 0.3)
    enc.eval()
    target = torch.randn(1, 12000) * 0.1
    with torch.no_grad():
        alone = enc(target)
        with_loud = enc(torch.cat([target, torch.randn(3, 12000) * 5.0]))[:1]
        with_silent = enc(torch.cat([torch.zeros(2, 12000), target]))[2:]
    torch.testing.assert_close(with_loud, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_silent, alone, atol=1e-5, rtol=1e-5)


def test_weighted_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 30))
    w = rng.random(size=(2, 5, 30))
    w /= w.sum(axis=2, keepdims=True)
    mean, std = _weighted_mean_std(torch.tensor(x), torch.tensor(w))
    ref_mean = (x * w).sum(2)
    ref_std = np.sqrt((w * (x - ref_mean[..., None]) ** 2).sum(2))
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-10)
    np.testing.assert_allclose(std.numpy(), ref_std, rtol=1e-6)


# ---------------------------------------------------------------- DINO head


def test_dino_head_shapes_fixed_norm_and_copies():
    torch.manual_seed(0)
    head = DINOHead(in_dim=32, hidden_dim=64, bottleneck_dim=16, out_dim=500, nlayers=3)
    x = torch.randn(8, 32)
    assert head(x).shape == (8, 500)

    wn = head.last_layer.parametrizations.weight
    assert not wn.original0.requires_grad
    assert [id(p) for p in head.last_layer_parameters()] == [id(wn.original1)]

    teacher = copy.deepcopy(head)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        opt.zero_grad()
        head(x).logsumexp(dim=1).mean().backward()
        opt.step()
    # rows of the last layer stay unit-norm: outputs are cosines to prototypes
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(500))
    assert torch.all(wn.original0 == 1.0)
    # the copy is independent of the student, then an EMA step moves it toward the student
    assert not torch.equal(teacher.last_layer.weight, head.last_layer.weight)
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), head.parameters()):
            pt.mul_(0.5).add_(ps, alpha=0.5)
    torch.testing.assert_close(teacher.last_layer.weight.norm(dim=1), torch.ones(500))

    fresh = DINOHead(in_dim=32, hidden_dim=64, bottleneck_dim=16, out_dim=500, nlayers=3)
    fresh.load_state_dict(roundtrip_state(head))
    head.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), head(x))


def test_dino_head_bottleneck_is_l2_normalised():
    torch.manual_seed(1)
    head = DINOHead(in_dim=8, hidden_dim=16, bottleneck_dim=4, out_dim=10, nlayers=2).eval()
    x = torch.randn(5, 8)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight
    torch.testing.assert_close(head(x), z @ w.T)
    assert head(x).abs().max() <= 1.0 + 1e-6  # cosines


# ---------------------------------------------------------------- AAM-softmax


def numpy_aam_logits(emb, weight, labels, m, s):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1.0, 1.0)
    logits = s * cos
    for i, y in enumerate(labels):
        theta = np.arccos(cos[i, y])
        if theta <= np.pi - m:
            logits[i, y] = s * np.cos(theta + m)
        else:
            logits[i, y] = s * (cos[i, y] - m * np.sin(m))
    return logits, cos


def test_aam_softmax_matches_direct_angle_computation():
    torch.manual_seed(0)
    aam = AAMSoftmax(embed_dim=16, num_classes=12, margin=0.3, scale=30.0)
    weight = aam.weight.detach().double().numpy()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=40)
    emb = rng.normal(size=(40, 16))
    # a quarter nearly opposite their class (θ > π − m), exercising the fallback branch
    emb[:10] = -weight[labels[:10]] + 0.05 * rng.normal(size=(10, 16))
    loss, logits = aam(torch.tensor(emb, dtype=torch.float32), torch.tensor(labels))
    ref, cos = numpy_aam_logits(emb, weight, labels, 0.3, 30.0)
    theta = np.arccos(cos[np.arange(40), labels])
    assert (theta > np.pi - 0.3).sum() >= 5 and (theta <= np.pi - 0.3).sum() >= 20
    np.testing.assert_allclose(logits.detach().numpy(), ref, atol=2e-4)
    ref_loss = -(ref[np.arange(40), labels] - np.log(np.exp(ref).sum(axis=1)))
    assert loss.shape == (40,)
    np.testing.assert_allclose(loss.detach().numpy(), ref_loss, rtol=1e-4, atol=1e-4)


def test_aam_margin_override_and_cosine():
    torch.manual_seed(0)
    aam = AAMSoftmax(embed_dim=8, num_classes=5, margin=0.2, scale=10.0)
    emb, labels = torch.randn(6, 8), torch.randint(0, 5, (6,))
    cos = aam.cosine(emb)
    ref = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(aam.weight, dim=1).T
    torch.testing.assert_close(cos, ref)
    _, no_margin = aam(emb, labels, margin=0.0)
    torch.testing.assert_close(no_margin, 10.0 * cos, atol=1e-5, rtol=1e-5)
    loss_small, _ = aam(emb, labels, margin=0.05)
    loss_full, _ = aam(emb, labels)
    assert torch.all(loss_full > loss_small)  # a larger margin makes every target harder
    ref_loss, _ = numpy_aam_logits(emb.double().numpy(), aam.weight.detach().double().numpy(), labels.numpy(), 0.05, 10.0)
    _, logits = aam(emb, labels, margin=0.05)
    np.testing.assert_allclose(logits.detach().numpy(), ref_loss, atol=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["theta0", "thetapi"])
def test_aam_finite_at_theta_zero_and_pi(sign):
    torch.manual_seed(0)
    aam = AAMSoftmax(embed_dim=8, num_classes=4, margin=0.2, scale=30.0)
    labels = torch.tensor([0, 1, 2, 3])
    emb = (sign * aam.weight.detach().clone()).requires_grad_(True)
    loss, logits = aam(emb, labels)
    assert torch.isfinite(loss).all() and torch.isfinite(logits).all()
    loss.sum().backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(aam.weight.grad).all()
    target = logits[torch.arange(4), labels]
    if sign > 0:
        # float32 cosines near 1 resolve angles to ~5e-4 rad, hence the tolerance (margin effect is 0.6)
        torch.testing.assert_close(target, torch.full((4,), 30.0 * math.cos(0.2)), atol=5e-3, rtol=0)
    else:
        torch.testing.assert_close(target, torch.full((4,), 30.0 * (-1 - 0.2 * math.sin(0.2))), atol=5e-3, rtol=0)


def test_aam_target_logit_monotonic_in_angle():
    aam = AAMSoftmax(embed_dim=2, num_classes=1, margin=0.5, scale=1.0)
    with torch.no_grad():
        aam.weight.copy_(torch.tensor([[1.0, 0.0]]))
    theta = torch.linspace(0, math.pi, 2001)
    emb = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    _, logits = aam(emb, torch.zeros(2001, dtype=torch.long))
    assert torch.all(logits[1:, 0] <= logits[:-1, 0] + 1e-6)


def test_margin_warmup():
    assert margin_at(0.0, 0.2, 2.0) == 0.0
    assert margin_at(1.0, 0.2, 2.0) == pytest.approx(0.1)
    assert margin_at(5.0, 0.2, 2.0) == pytest.approx(0.2)
    assert margin_at(0.0, 0.2, 0.0) == pytest.approx(0.2)


# ---------------------------------------------------------------- WavLM + MHFA

wavlm_mhfa = pytest.importorskip("raysv.models.wavlm_mhfa")


def test_reference_sizes_without_weights():
    with torch.device("meta"):
        backbone = wavlm_mhfa.WavLMModel(wavlm_mhfa.reference_wavlm_base_plus_config())
        enc = wavlm_mhfa.WavLMMHFA(backbone, heads=64, compression=128, embed_dim=256)
        aam = AAMSoftmax(256, 7500)
    assert abs(count(enc.backbone) - 94.4e6) / 94.4e6 < 0.03
    assert abs(count(enc.mhfa) - 2.3e6) / 2.3e6 < 0.03
    assert enc.mhfa.num_hidden_states == 13
    assert count(aam) == 7500 * 256
    assert enc.embed_dim == 256


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return wavlm_mhfa.save_tiny_wavlm(tmp_path_factory.mktemp("tiny_wavlm"), seed=0)


def test_tiny_wavlm_saved_and_reloaded_identically(tiny_folder):
    torch.manual_seed(0)
    reference = wavlm_mhfa.WavLMModel(wavlm_mhfa.tiny_wavlm_config())
    enc = wavlm_mhfa.load_wavlm_mhfa(str(tiny_folder), heads=4, compression=16, embed_dim=32)
    loaded = enc.backbone.state_dict()
    ref = reference.state_dict()
    assert set(loaded) == set(ref)
    for key, value in ref.items():
        assert torch.equal(loaded[key], value), key
    other = wavlm_mhfa.WavLMModel(wavlm_mhfa.tiny_wavlm_config())  # next draw differs
    assert not torch.equal(other.feature_projection.projection.weight, reference.feature_projection.projection.weight)
    assert enc.backbone.config.inputs_to_logits_ratio == 320
    assert enc.normalize is False  # Base+-style folder: do_normalize false
    assert enc.spec()["pretrained"] == str(tiny_folder)


def test_wavlm_mhfa_forward_frozen_cnn(tiny_folder):
    enc = wavlm_mhfa.load_wavlm_mhfa(str(tiny_folder), heads=4, compression=16, embed_dim=32).train()
    cnn = enc.backbone.feature_extractor
    assert all(not p.requires_grad for p in cnn.parameters())
    seen = {}
    cnn.conv_layers[-1].register_forward_hook(
        lambda m, a, out: seen.update(grad=torch.is_grad_enabled(), req=out.requires_grad)
    )
    out = enc(torch.randn(2, 16000))
    assert out.shape == (2, 32)
    assert seen == {"grad": False, "req": False}
    assert torch.is_grad_enabled()  # grad mode restored after the CNN
    out.pow(2).sum().backward()
    assert all(p.grad is None for p in cnn.parameters())
    transformer = enc.backbone.encoder.layers[-1].feed_forward.output_dense.weight
    assert transformer.grad is not None and transformer.grad.abs().sum() > 0
    assert enc.mhfa.layer_weights_k.grad.abs().sum() > 0


def test_grad_mult_scales_backbone_gradient_only(tiny_folder):
    base = wavlm_mhfa.load_wavlm_mhfa(str(tiny_folder), heads=4, compression=16, embed_dim=32).eval()
    scaled = copy.deepcopy(base)
    scaled.grad_mult = 0.1
    x = torch.randn(2, 12000)
    grads = []
    for enc in (base, scaled):
        enc.zero_grad()
        enc(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None})
    backbone_keys = [n for n in grads[0] if n.startswith("backbone.")]
    mhfa_keys = [n for n in grads[0] if n.startswith("mhfa.")]
    assert len(backbone_keys) > 10 and len(mhfa_keys) == 10
    for n in backbone_keys:
        torch.testing.assert_close(grads[1][n], 0.1 * grads[0][n], rtol=1e-4, atol=1e-9)
    for n in mhfa_keys:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def test_input_normalisation_follows_config(tiny_folder):
    layer_cfg = wavlm_mhfa.tiny_wavlm_config()
    layer_cfg.feat_extract_norm = "layer"
    large_style = wavlm_mhfa.WavLMMHFA(wavlm_mhfa.WavLMModel(layer_cfg), heads=2, compression=8, embed_dim=8)
    base_style = wavlm_mhfa.load_wavlm_mhfa(str(tiny_folder), heads=2, compression=8, embed_dim=8)
    forced = wavlm_mhfa.load_wavlm_mhfa(str(tiny_folder), heads=2, compression=8, embed_dim=8, normalize=True)
    assert (large_style.normalize, base_style.normalize, forced.normalize) == (True, False, True)
    wave = 0.3 + 0.05 * torch.randn(2, 8000)
    for enc, normalised in ((large_style, True), (base_style, False), (forced, True)):
        seen = []
        enc.backbone.feature_extractor.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        with torch.no_grad():
            enc.eval()(wave)
        inp = seen[0]
        if normalised:
            torch.testing.assert_close(inp.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
            torch.testing.assert_close(inp.std(1), torch.ones(2), atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(inp, wave)


# ---------------------------------------------------------------- rebuild from spec


def test_build_encoder_roundtrip_ecapa():
    torch.manual_seed(0)
    enc = ECAPAEncoder(channels=64, mfa_channels=192, embed_dim=48, n_mels=40)
    enc.train()
    with torch.no_grad():
        enc(torch.randn(4, 16000))  # move BN running stats off their defaults
    spec = json.loads(json.dumps(enc.spec()))
    assert spec == {"kind": "ecapa", "channels": 64, "mfa_channels": 192, "embed_dim": 48, "n_mels": 40, "norm": "mean"}
    rebuilt = build_encoder(spec)
    x = torch.randn(2, 20000)
    assert not torch.allclose(rebuilt.eval()(x), enc.eval()(x))
    rebuilt.load_state_dict(roundtrip_state(enc))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), enc(x))


def test_build_encoder_roundtrip_wavlm_mhfa(tiny_folder):
    enc = wavlm_mhfa.load_wavlm_mhfa(str(tiny_folder), heads=4, compression=16, embed_dim=32, grad_mult=0.5)
    spec = json.loads(json.dumps(enc.spec()))
    assert spec["kind"] == "wavlm_mhfa" and spec["grad_mult"] == 0.5 and spec["heads"] == 4
    assert spec["wavlm_config"]["hidden_size"] == 64
    rebuilt = build_encoder(spec)
    assert isinstance(rebuilt, wavlm_mhfa.WavLMMHFA) and rebuilt.embed_dim == 32
    assert rebuilt.grad_mult == 0.5 and rebuilt.normalize == enc.normalize
    rebuilt.load_state_dict(roundtrip_state(enc))
    x = torch.randn(2, 16000)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), enc.eval()(x))


def test_build_encoder_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown encoder kind"):
        build_encoder({"kind": "resnet"})
