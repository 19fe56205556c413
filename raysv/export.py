"""Export a trained model to ONNX: 16 kHz waveform in, L2-normalised embedding out, the runtime facts inside.

The graph is the whole encoder (the ECAPA-TDNN with its fbank front end, or WavLM + MHFA),
exported by ``torch.onnx.export(dynamo=True)`` with a dynamic batch and length, so files
of any duration go through it. What a runtime needs besides the graph — sample rate,
embedding size, the decision threshold and the scoring it belongs to, the evaluation
protocol — is stored in the ONNX file's metadata under ``raysv.model``; an AS-norm cohort,
when the model has one, is written beside it as ``<name>.cohort.npy``.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysv.artifacts.checkpoint import read_model_json
from raysv.audio.io import SAMPLE_RATE
from raysv.models import load_encoder

log = logging.getLogger(__name__)

METADATA_KEY = "raysv.model"
INPUT_NAME = "waveform"
OUTPUT_NAME = "speaker_embedding"
FACTS = ("sample_rate", "embed_dim", "threshold", "threshold_scoring", "threshold_from", "eval", "asnorm_top_n",
         "method", "features")


class NormalisedEncoder(nn.Module):
    """The encoder followed by L2 normalisation: what the ONNX graph computes."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.encoder(waveform).float(), dim=-1)


def default_output(checkpoint: str | Path) -> Path:
    """``<checkpoint>/model.onnx``."""
    return Path(checkpoint) / "model.onnx"


def export_onnx(checkpoint: str | Path, out: str | Path | None = None, *, seconds: float = 2.0,
                opset: int = 18) -> Path:
    """Write ``out`` (default ``<checkpoint>/model.onnx``): the checkpoint's encoder as ONNX.

    ``seconds`` is the length of the example waveforms the graph is traced with; batch and
    length stay dynamic. Returns the path written.
    """
    checkpoint = Path(checkpoint)
    meta = read_model_json(checkpoint)
    out = Path(out) if out is not None else default_output(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    encoder, _ = load_encoder(checkpoint, "cpu")
    if hasattr(getattr(encoder, "backbone", None), "config"):
        encoder.backbone.config._attn_implementation = "eager"  # plain matmuls: no fused kernels to translate
    model = NormalisedEncoder(encoder).eval()
    # Two example waveforms: a batch dimension of size 1 would be specialised away.
    example = torch.randn(2, max(int(seconds * SAMPLE_RATE), 1600), generator=torch.Generator().manual_seed(0))
    shapes = {"waveform": {0: torch.export.Dim("batch"), 1: torch.export.Dim("samples", min=1600)}}
    tmp = out.with_name(out.name + ".partial")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False)
        program.save(str(tmp))
    facts = {k: meta[k] for k in FACTS if k in meta}
    facts["encoder"] = meta["encoder"].get("kind")
    facts["min_samples"] = 1600
    if meta.get("cohort"):
        cohort = out.with_name(out.stem + ".cohort.npy")
        shutil.copyfile(checkpoint / meta["cohort"], cohort)
        facts["cohort"] = cohort.name
    _set_metadata(tmp, facts)
    tmp.replace(out)
    log.info("exported %s to %s (%s, %d-d)", checkpoint, out, facts["encoder"], facts.get("embed_dim", 0))
    return out


def _set_metadata(path: Path, facts: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(facts, sort_keys=True)
    onnx.save(model, str(path))


def read_onnx_facts(path: str | Path) -> dict[str, Any]:
    """The ``raysv.model`` metadata of an exported file (a clear error for any other ONNX file)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{path} is not a raysv export: its metadata has no {METADATA_KEY!r}")


class OnnxEncoder:
    """An ONNX Runtime session behind the interface the embedding code calls: ``(B, samples)`` → ``(B, D)``.

    Waveforms shorter than the graph's minimum are wrapped around to it, as the crops of
    short files are.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        facts = read_onnx_facts(path)
        self.min_samples = int(facts.get("min_samples", 1600))
        self.embed_dim = int(facts["embed_dim"])
        self.training = False

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.detach().float().cpu().numpy()
        if x.ndim == 1:
            x = x[None]
        if x.shape[1] < self.min_samples:
            x = np.stack([np.resize(row, self.min_samples) for row in x])
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return torch.from_numpy(out)

    def eval(self) -> "OnnxEncoder":
        return self

    def train(self, mode: bool = True) -> "OnnxEncoder":
        return self
