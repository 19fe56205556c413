"""Use a trained model: embed audio, score pairs, enrol and identify speakers.

``load_model(path)`` takes a model folder (PyTorch) or a file written by ``raysv export``
(ONNX Runtime) and gives a :class:`SpeakerModel`:

- ``embed`` / ``extract_embedding``: a file's whole-length unit embedding;
- ``score`` / ``verify``: the trial score of two files as evaluation computed it (the crops,
  score fusion and AS-norm of ``model.json``'s ``eval``), so the stored threshold applies;
- ``compute_similarity``: WeSpeaker's (cos + 1) / 2 of two whole-file embeddings;
- ``register`` / ``recognize``, ``enroll`` / ``identify``: speakers as the normalised mean
  of their files' embeddings (:mod:`raysv.speakers`), in memory or in a database file.

Scores are cosines in [-1, 1] (AS-norm scores, when the model has a cohort, are
standardised and unbounded). The threshold is the equal-error-rate point on the dev
list when the model was evaluated (``model.json``: ``threshold``, ``threshold_scoring`` says
raw or AS-norm; ``embedding_threshold`` is the same point for plain whole-file cosines);
pass ``threshold=`` to decide at another operating point.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Union

import numpy as np
import torch

from raysv.audio import MIN_SECONDS
from raysv.audio.io import SAMPLE_RATE, AudioReadError, read_audio, resample
from raysv.embedding.core import TrialProtocol, fused_cohort, trial_embedding, utterance_embedding
from raysv.errors import InputError
from raysv.evaluation.scoring import score_trials
from raysv.speakers import Match, SpeakerDB

Audio = Union[str, Path, np.ndarray]
"""A path to an audio file, or a 1-D float waveform."""

DEFAULT_MAX_SECONDS = 30.0
RUNTIMES = ("torch", "onnx")


class SpeakerModel:
    """A loaded encoder with its evaluation protocol, cohort and thresholds."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, runtime: str | None = None,
                 threads: int | None = None) -> None:
        self.path = Path(path)
        self.runtime = runtime or ("onnx" if self.path.suffix == ".onnx" else "torch")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "onnx":
            from raysv.export import OnnxEncoder, read_onnx_facts

            self.meta = read_onnx_facts(self.path)
            self.encoder = OnnxEncoder(self.path, threads=threads)
            self.device = torch.device("cpu")
            cohort_dir = self.path.parent
        else:
            from raysv.models import load_encoder

            if threads:
                torch.set_num_threads(int(threads))
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            self.encoder, self.meta = load_encoder(self.path, self.device)
            cohort_dir = self.path
        self.sample_rate = int(self.meta.get("sample_rate", SAMPLE_RATE))
        settings = self.meta.get("eval") or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{self.path}: 'eval' must be an object, got {settings!r}")
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
            cohort_path = cohort_dir / str(cohort_name)
            if not cohort_path.is_file():
                raise FileNotFoundError(f"{self.path} names the AS-norm cohort {cohort_name}, which is missing")
            self.cohort = np.load(cohort_path).astype(np.float32)
            if self.cohort.ndim != 2 or self.cohort.shape[1] != self.embed_dim:
                raise ValueError(f"{cohort_path}: cohort must be (N, {self.embed_dim}), got {self.cohort.shape}")
            top_n = self.meta.get("asnorm_top_n")
            self.top_n = int(top_n) if top_n is not None else None
        threshold = self.meta.get("threshold")
        self.threshold: float | None = float(threshold) if threshold is not None else None
        embedding_threshold = self.meta.get("embedding_threshold", threshold if self.protocol.cosine else None)
        self.embedding_threshold: float | None = None if embedding_threshold is None else float(embedding_threshold)
        self.speakers = SpeakerDB(dim=self.embed_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def _wave(self, audio: Audio, sample_rate: int | None) -> np.ndarray:
        if isinstance(audio, (str, Path)):
            wave = read_audio(audio, self.sample_rate)
            if wave.size == 0:
                raise AudioReadError(audio, "the file holds no samples")
            if wave.size < MIN_SECONDS * self.sample_rate:
                raise AudioReadError(audio, f"{wave.size / self.sample_rate:.3f} s, shorter than {MIN_SECONDS:g} s")
            return wave
        wave = np.asarray(audio)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"a waveform must be a non-empty 1-D array, got shape {wave.shape}")
        if np.issubdtype(wave.dtype, np.integer):
            wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
        wave = wave.astype(np.float32, copy=False)
        if not np.isfinite(wave).all():
            raise ValueError("the waveform holds NaN or infinite samples")
        wave = resample(wave, int(sample_rate or self.sample_rate), self.sample_rate)
        if wave.size < MIN_SECONDS * self.sample_rate:
            raise ValueError(f"a waveform of {wave.size / self.sample_rate:.3f} s is shorter than {MIN_SECONDS:g} s")
        return wave

    # ---------------------------------------------------------------- embeddings and scores

    def embed(self, waveform_or_path: Audio, sample_rate: int | None = None) -> np.ndarray:
        """Unit-length (D,) embedding of the whole file; ``sample_rate`` describes a waveform argument."""
        wave = self._wave(waveform_or_path, sample_rate)
        return utterance_embedding(self.encoder, wave, self.protocol.max_seconds, self.device,
                                   sample_rate=self.sample_rate)

    def trial_vector(self, waveform_or_path: Audio, sample_rate: int | None = None) -> np.ndarray:
        """What a file is scored by under the protocol the model was evaluated with (crops, fusion)."""
        wave = self._wave(waveform_or_path, sample_rate)
        return trial_embedding(self.encoder, wave, self.protocol, self.device, self.sample_rate)

    def score(self, a: Audio, b: Audio, sample_rate: int | None = None) -> float:
        """The trial score of two files as evaluation computed it: crops and fusion of ``model.json``'s
        ``eval``, AS-normalised when the model has a cohort (the score its threshold belongs to)."""
        vectors = {"a": self.trial_vector(a, sample_rate), "b": self.trial_vector(b, sample_rate)}
        cohort = self.cohort
        if cohort is not None and not self.protocol.cosine:
            cohort = fused_cohort(cohort)
        return float(score_trials(vectors, ["a"], ["b"], cohort=cohort, top_n=self.top_n,
                                  cosine=self.protocol.cosine)[0])

    def verify(
        self, a: Audio, b: Audio, threshold: float | None = None, sample_rate: int | None = None
    ) -> tuple[float, bool]:
        """``(score, same speaker?)``, deciding with ``threshold`` or the one stored at evaluation."""
        if threshold is None:
            threshold = self.threshold
        if threshold is None:
            raise ValueError(
                f"{self.path} has no decision threshold: evaluate the model on a trial list "
                "first (which stores the EER threshold), or pass threshold="
            )
        s = self.score(a, b, sample_rate)
        return s, bool(s >= float(threshold))

    # ---------------------------------------------------------------- the WeSpeaker-shaped API

    def extract_embedding(self, audio: Audio, sample_rate: int | None = None) -> np.ndarray:
        """WeSpeaker's name for :meth:`embed`: the whole file's unit embedding."""
        return self.embed(audio, sample_rate)

    def extract_embedding_list(self, files: str | Path | Iterable[str | Path]) -> tuple[list[str], np.ndarray]:
        """``(names, (N, D) embeddings)`` of a list of paths, or of a Kaldi ``wav.scp`` (``utt_id path`` lines)."""
        from raysv.data.wavscp import read_wav_scp

        if isinstance(files, (str, Path)):
            listed = read_wav_scp(files)
        else:
            listed = {str(f): Path(f) for f in files}
        if not listed:
            raise ValueError("no files to embed")
        return list(listed), np.stack([self.embed(p) for p in listed.values()])

    def compute_similarity(self, a: Audio | np.ndarray, b: Audio | np.ndarray) -> float:
        """WeSpeaker's similarity: (cos + 1) / 2 of the two whole-file embeddings, in [0, 1].

        Arguments are files, waveforms, or embeddings already made (1-D arrays of the model's size).
        """
        ea, eb = (self._as_embedding(x) for x in (a, b))
        cos = float(ea @ eb / max(float(np.linalg.norm(ea) * np.linalg.norm(eb)), 1e-12))
        return (cos + 1.0) / 2.0

    def _as_embedding(self, x: Audio | np.ndarray) -> np.ndarray:
        if isinstance(x, np.ndarray) and x.ndim == 1 and x.size == self.embed_dim and x.dtype.kind == "f":
            return x.astype(np.float32)
        return self.embed(x)

    def register(self, name: str, audio: Audio | Iterable[Audio]) -> int:
        """Enrol ``name`` in this model's in-memory speaker table with one or more files; returns its file count."""
        items = [audio] if isinstance(audio, (str, Path, np.ndarray)) else list(audio)
        return self.speakers.add(name, np.stack([self.embed(x) for x in items]))

    def recognize(self, audio: Audio) -> dict[str, float | str]:
        """WeSpeaker's answer for the in-memory table: ``{"name", "confidence"}`` (the best cosine)."""
        best = self.speakers.identify(self.embed(audio), self.embedding_threshold)[0]
        return {"name": best.name, "confidence": best.score}

    # ---------------------------------------------------------------- speaker databases on disk

    def enroll(self, db: str | Path, name: str, files: Iterable[Audio]) -> int:
        """Add ``files`` to ``name`` in the database file ``db`` (created if missing); returns its file count."""
        table = SpeakerDB(db, dim=self.embed_dim)
        embeddings = [self.embed(f) for f in files]
        if not embeddings:
            raise InputError(f"enroll {name}: no files given")
        count = table.add(name, np.stack(embeddings))
        table.save()
        return count

    def identify(self, db: str | Path | SpeakerDB, audio: Audio, top: int = 1,
                 threshold: float | None = None) -> list[Match]:
        """The ``top`` best speakers of ``db`` for a file; "unknown" below the threshold
        (``threshold`` or ``embedding_threshold``)."""
        table = db if isinstance(db, SpeakerDB) else SpeakerDB(db, dim=self.embed_dim)
        if isinstance(db, (str, Path)) and not Path(db).is_file():
            raise FileNotFoundError(f"speaker database {db} does not exist: enroll speakers first")
        return table.identify(self.embed(audio), self.embedding_threshold if threshold is None else threshold, top)

    def __repr__(self) -> str:
        kind = self.meta.get("encoder") if self.runtime == "onnx" else self.meta.get("encoder", {}).get("kind", "?")
        return (f"SpeakerModel({str(self.path)!r}, runtime={self.runtime}, encoder={kind}, dim={self.embed_dim}, "
                f"threshold={self.threshold})")


def load_model(path: str | Path, device: str | torch.device | None = None, runtime: str | None = None,
               threads: int | None = None) -> SpeakerModel:
    """Load a model folder (PyTorch; GPU when available unless ``device`` says otherwise) or an
    exported ``.onnx`` file (ONNX Runtime, ``runtime="onnx"``)."""
    return SpeakerModel(path, device, runtime, threads)


__all__ = ["SpeakerModel", "load_model"]
