"""ONNX export: the same embeddings as PyTorch for both round models, at lengths other than the traced one."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from raysv.artifacts.checkpoint import read_model_json, save_model, write_model_json
from raysv.export import export_onnx, read_onnx_facts
from raysv.inference import load_model
from raysv.models.ecapa import ECAPAEncoder
from raysv.models.wavlm_mhfa import load_wavlm_mhfa, save_tiny_wavlm

LENGTHS = (0.7, 1.9, 3.0, 7.3)


@pytest.fixture(scope="module")
def round_models(tmp_path_factory):
    """An ECAPA (with its fbank front end) and a tiny WavLM + MHFA, saved as raysv model folders."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    ecapa = save_model(root / "ecapa", ECAPAEncoder(channels=32, mfa_channels=96, embed_dim=16, norm="mean_std"))
    wavlm = save_tiny_wavlm(root / "tiny", hidden_size=32, layers=2, heads=2, intermediate=64, conv_dim=16)
    mhfa = save_model(root / "wavlm", load_wavlm_mhfa(str(wavlm), 4, 8, 16).eval())
    for folder in (ecapa, mhfa):
        meta = read_model_json(folder)
        meta.update({"threshold": 0.42, "eval": {"crops": 0, "max_seconds": 30.0}})
        write_model_json(folder, meta)
    return {"ecapa": ecapa, "wavlm_mhfa": mhfa}


@pytest.mark.parametrize("kind", ["ecapa", "wavlm_mhfa"])
def test_onnx_embeddings_match_pytorch(round_models, kind, tmp_path):
    folder = round_models[kind]
    path = export_onnx(folder, tmp_path / f"{kind}.onnx", seconds=2.0)
    facts = read_onnx_facts(path)
    assert facts["encoder"] == kind and facts["sample_rate"] == 16000 and facts["embed_dim"] == 16
    assert facts["threshold"] == 0.42
    pt = load_model(folder, device="cpu")
    ox = load_model(path, runtime="onnx")
    assert ox.threshold == pt.threshold and ox.embed_dim == pt.embed_dim
    rng = np.random.default_rng(1)
    for seconds in LENGTHS:
        t = np.arange(int(seconds * 16000)) / 16000
        wave = (0.3 * np.sin(2 * np.pi * 170 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
                + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
        a, b = pt.embed(wave), ox.embed(wave)
        assert np.linalg.norm(b) == pytest.approx(1.0, abs=1e-5)
        assert np.abs(a - b).max() <= 1e-4, (kind, seconds, float(np.abs(a - b).max()))


def test_export_command_writes_the_onnx_file(round_models, tmp_path):
    out = tmp_path / "m.onnx"
    done = subprocess.run([sys.executable, "-m", "raysv.cli", "export", "--checkpoint", str(round_models["ecapa"]),
                           "--format", "onnx", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and str(out) in done.stdout
    bad = subprocess.run([sys.executable, "-m", "raysv.cli", "export", "--checkpoint", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "nothing" in bad.stderr and "Traceback" not in bad.stderr
