"""Use a trained checkpoint: embed audio, score pairs, accept or reject.

``load_model(folder)`` gives a :class:`SpeakerModel`. ``embed`` is a file's whole-length
unit embedding; ``score`` and ``verify`` follow the trial protocol the model was evaluated
with (``model.json``'s ``"eval"``: crops, score fusion, AS-norm), so the decision threshold
stored by evaluation applies unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch

from raysv.audio.io import SAMPLE_RATE, read_audio, resample
from raysv.embedding.core import TrialProtocol, fused_cohort, trial_embedding, utterance_embedding
from raysv.evaluation.scoring import score_trials
from raysv.models import load_encoder

Audio = Union[str, Path, np.ndarray]
"""A path to an audio file, or a 1-D float waveform."""

DEFAULT_MAX_SECONDS = 30.0


class SpeakerModel:
    """A loaded encoder with its evaluation settings, cohort and threshold."""

    def __init__(self, folder: str | Path, device: str | torch.device | None = None) -> None:
        self.folder = Path(folder)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.encoder, self.meta = load_encoder(self.folder, self.device)
        self.sample_rate = int(self.meta.get("sample_rate", SAMPLE_RATE))
        settings = self.meta.get("eval") or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{self.folder}/model.json: 'eval' must be an object, got {settings!r}")
        # Models evaluated before positions/fusion were recorded used random crops averaged into one embedding.
        self.protocol = TrialProtocol(
            crops=int(settings.get("crops", 0)),
            crop_seconds=float(settings.get("crop_seconds", 4.0)),
            max_seconds=float(settings.get("max_seconds", DEFAULT_MAX_SECONDS)),
            positions=str(settings.get("positions", "random")),
            fusion=str(settings.get("fusion", "embedding")),
            seed=int(settings.get("seed", 0)),
        )
        self.cohort: np.ndarray | None = None
        self.top_n: int | None = None
        cohort_name = self.meta.get("cohort")
        if cohort_name:
            path = self.folder / str(cohort_name)
            if not path.is_file():
                raise FileNotFoundError(
                    f"{self.folder}/model.json names the AS-norm cohort {cohort_name}, which is missing"
                )
            self.cohort = np.load(path).astype(np.float32)
            if self.cohort.ndim != 2 or self.cohort.shape[1] != int(self.meta.get("embed_dim", self.cohort.shape[1])):
                raise ValueError(f"{path}: cohort must be (N, {self.meta.get('embed_dim')}), got {self.cohort.shape}")
            top_n = self.meta.get("asnorm_top_n")
            self.top_n = int(top_n) if top_n is not None else None
        threshold = self.meta.get("threshold")
        self.threshold: float | None = float(threshold) if threshold is not None else None

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def _wave(self, audio: Audio, sample_rate: int) -> np.ndarray:
        if isinstance(audio, (str, Path)):
            return read_audio(audio, self.sample_rate)
        wave = np.asarray(audio)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"a waveform must be a non-empty 1-D array, got shape {wave.shape}")
        if np.issubdtype(wave.dtype, np.integer):
            wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
        return resample(wave.astype(np.float32, copy=False), int(sample_rate), self.sample_rate)

    def embed(self, waveform_or_path: Audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Unit-length (D,) embedding of the whole file; ``sample_rate`` describes a waveform argument."""
        wave = self._wave(waveform_or_path, sample_rate)
        return utterance_embedding(self.encoder, wave, self.protocol.max_seconds, self.device,
                                   sample_rate=self.sample_rate)

    def trial_vector(self, waveform_or_path: Audio, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """What a file is scored by under the protocol the model was evaluated with (crops, fusion)."""
        wave = self._wave(waveform_or_path, sample_rate)
        return trial_embedding(self.encoder, wave, self.protocol, self.device, self.sample_rate)

    def score(self, a: Audio, b: Audio, sample_rate: int = SAMPLE_RATE) -> float:
        """The trial score of two files as evaluation computed it: crops and fusion of ``model.json``'s
        ``eval``, AS-normalised when the checkpoint has a cohort (the score its threshold belongs to)."""
        vectors = {"a": self.trial_vector(a, sample_rate), "b": self.trial_vector(b, sample_rate)}
        cohort = self.cohort
        if cohort is not None and not self.protocol.cosine:
            cohort = fused_cohort(cohort)
        return float(score_trials(vectors, ["a"], ["b"], cohort=cohort, top_n=self.top_n,
                                  cosine=self.protocol.cosine)[0])

    def verify(
        self, a: Audio, b: Audio, threshold: float | None = None, sample_rate: int = SAMPLE_RATE
    ) -> tuple[float, bool]:
        """``(score, same speaker?)``, deciding with ``threshold`` or the one stored at evaluation."""
        if threshold is None:
            threshold = self.threshold
        if threshold is None:
            raise ValueError(
                f"{self.folder} has no decision threshold in model.json: evaluate the model on a trial list "
                "first (which stores the EER threshold), or pass threshold="
            )
        s = self.score(a, b, sample_rate)
        return s, bool(s >= float(threshold))

    def __repr__(self) -> str:
        kind = self.meta.get("encoder", {}).get("kind", "?")
        return f"SpeakerModel({str(self.folder)!r}, encoder={kind}, dim={self.embed_dim}, threshold={self.threshold})"


def load_model(path: str | Path, device: str | torch.device | None = None) -> SpeakerModel:
    """Load a checkpoint folder for inference (GPU when available unless ``device`` says otherwise)."""
    return SpeakerModel(path, device)


__all__ = ["SpeakerModel", "load_model"]
