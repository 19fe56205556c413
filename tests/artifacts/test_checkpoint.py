"""Blending a fine-tune's end with its start (``lmft.start_weight``): the weights, the record, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from raysv.artifacts.checkpoint import blend_with_start, load_weights, save_model
from raysv.models.ecapa import ECAPAEncoder


def encoder(seed: int, channels: int = 16) -> ECAPAEncoder:
    torch.manual_seed(seed)
    model = ECAPAEncoder(channels=channels, mfa_channels=3 * channels, embed_dim=8, n_mels=20)
    with torch.no_grad():  # BatchNorm statistics and step counts that differ between the two
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.num_batches_tracked.fill_(seed + 1)
    return model


def test_blend_is_the_weighted_mean_of_every_float_tensor(tmp_path):
    end, start = save_model(tmp_path / "end", encoder(1)), save_model(tmp_path / "start", encoder(2))
    before, first = load_weights(end), load_weights(start)
    blend_with_start(end, start, 0.25)
    blended = load_weights(end)
    assert blended.keys() == before.keys()
    for name, value in blended.items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.75 * before[name] + 0.25 * first[name], atol=1e-6), name
        else:  # integer buffers stay the end's
            assert torch.equal(value, before[name]), name
    assert json.loads((end / "model.json").read_text())["start_weight"] == 0.25
    # the blended folder still loads as the encoder it was
    encoder(3).load_state_dict(blended)


def test_blend_refuses_other_encoders_and_weights_outside_0_1(tmp_path):
    end, other = save_model(tmp_path / "end", encoder(1)), save_model(tmp_path / "other", encoder(2, channels=8))
    with pytest.raises(ValueError, match="different encoders"):
        blend_with_start(end, other, 0.5)
    with pytest.raises(ValueError, match=r"start_weight must be in \[0, 1\), got 1.0"):
        blend_with_start(end, end, 1.0)
