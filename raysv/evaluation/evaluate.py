"""Evaluate an embedder on a VoxCeleb-format trial list: embed each utterance once, score, measure.

The embedder is either the untrained ``fbank-mean`` baseline (computed in this
process) or a checkpoint, embedded by the Ray actor pool of
:mod:`raysv.embedding.pool` so that VoxCeleb1-E/H's 145k utterances run in parallel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysv.audio.io import SAMPLE_RATE, read_audio
from raysv.data.trials import read_trials, resolve_trial_audio
from raysv.embedding.baseline import fbank_mean_embedding
from raysv.embedding.core import crop_rng, multicrop_embedding
from raysv.evaluation.scoring import decide, evaluate_scores, score_trials

log = logging.getLogger(__name__)

EMBEDDERS = ("fbank-mean", "checkpoint")


@dataclass
class AsNormConfig:
    top_n: int | None = None  # None disables AS-norm
    cohort_size: int = 20000


@dataclass
class EvalConfig:
    """``eval``: how a trial file is embedded (whole utterance plus crops) and scored."""

    crops: int = 15
    crop_seconds: float = 4.0
    max_seconds: float = 30.0
    asnorm: AsNormConfig = field(default_factory=AsNormConfig)
    seed: int = 0


def _fbank_mean_embeddings(
    files: dict[str, Path], crops: int, crop_seconds: float, seed: int
) -> dict[str, np.ndarray]:
    """The baseline embedding of every file, in this process, with a progress bar."""
    from tqdm.auto import tqdm

    def embed_fn(batch: np.ndarray) -> np.ndarray:
        return np.stack([fbank_mean_embedding(w, SAMPLE_RATE) for w in batch])

    crop_samples = max(1, int(round(crop_seconds * SAMPLE_RATE)))
    out: dict[str, np.ndarray] = {}
    for key, path in tqdm(files.items(), desc="fbank-mean", unit="utt", total=len(files)):
        wave = read_audio(path, SAMPLE_RATE)
        if wave.size == 0:
            raise ValueError(f"{path}: the audio is empty")
        out[key] = multicrop_embedding(embed_fn, wave, crops, crop_samples, crop_rng(seed, wave))
    return out


def evaluate_trials(
    trials: str | Path,
    audio_root: str | Path,
    *,
    embedder: str = "fbank-mean",
    checkpoint: str | Path | None = None,
    crops: int = 0,
    crop_seconds: float = 4.0,
    max_seconds: float = 30.0,
    cohort: np.ndarray | None = None,
    top_n: int | None = None,
    seed: int = 0,
    plots_dir: str | Path | None = None,
    threshold: float | None = None,
    embeddings: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """EER, minDCF (p 0.01, 0.05), the EER threshold and the trial count of one trial list.

    A ``checkpoint``, when given, is what gets evaluated (``embedder`` is then
    ``"checkpoint"``); otherwise ``embedder`` must be ``"fbank-mean"``. Scores are
    cosine, AS-normalised against ``cohort`` embeddings (top ``top_n``) when a cohort
    is given. With ``threshold`` the accuracy of accepting ``score >= threshold`` is
    added; with ``plots_dir`` ``det.png``, ``scores.png`` and ``scores.txt`` are written.
    ``embeddings`` (per utterance of the list) skips embedding: several lists embedded at once.
    """
    if checkpoint is not None:
        embedder = "checkpoint"
    if embedder not in EMBEDDERS:
        raise ValueError(f"unknown embedder {embedder!r}; expected one of {', '.join(EMBEDDERS)}")
    if embedder == "checkpoint" and checkpoint is None:
        raise ValueError("embedder 'checkpoint' needs checkpoint=<folder>")
    if crops < 0:
        raise ValueError(f"crops must be >= 0, got {crops}")
    if top_n is not None and cohort is None:
        raise ValueError("top_n is set but no AS-norm cohort was given")
    trial_list = read_trials(trials)
    files = resolve_trial_audio(trial_list, audio_root)

    start = time.perf_counter()
    if embeddings is not None:
        missing = sorted(set(files) - set(embeddings))
        if missing:
            raise ValueError(f"{len(missing)} utterance(s) of {trials} have no embedding, e.g. {missing[0]}")
    elif embedder == "fbank-mean":
        embeddings = _fbank_mean_embeddings(files, crops, crop_seconds, seed)
    else:
        from raysv.embedding.pool import embed_files

        embeddings = embed_files(
            checkpoint, files, crops=crops, crop_seconds=crop_seconds, max_seconds=max_seconds, seed=seed
        )
    embed_seconds = time.perf_counter() - start

    scores = score_trials(embeddings, trial_list.enroll, trial_list.test, cohort=cohort, top_n=top_n)
    labels = trial_list.labels.astype(np.int64)
    metrics: dict[str, Any] = evaluate_scores(scores, labels)
    metrics["utterances"] = len(files)
    metrics["embedder"] = str(checkpoint) if checkpoint is not None else embedder
    metrics["asnorm"] = cohort is not None
    metrics["embed_seconds"] = round(embed_seconds, 3)
    if threshold is not None:
        metrics["accuracy_at_threshold"] = float(np.mean(decide(scores, float(threshold)) == labels.astype(bool)))
        metrics["given_threshold"] = float(threshold)
    if plots_dir is not None:
        metrics.update(_write_outputs(Path(plots_dir), scores, labels, trial_list.enroll, trial_list.test,
                                      threshold if threshold is not None else metrics["threshold"]))
    log.info(format_metrics(Path(trials).name, metrics))
    return metrics


def _write_outputs(
    folder: Path, scores: np.ndarray, labels: np.ndarray, enroll: list[str], test: list[str], threshold: float
) -> dict[str, str]:
    """``scores.txt`` (``score label enroll test``), the DET curve and the score histogram."""
    from raysv.evaluation.plots import plot_det, plot_score_histogram

    folder.mkdir(parents=True, exist_ok=True)
    scores_path = folder / "scores.txt"
    with scores_path.open("w") as f:
        for s, lab, e, t in zip(scores, labels, enroll, test):
            f.write(f"{float(s):.6f} {int(lab)} {e} {t}\n")
    det = plot_det(scores, labels, folder / "det.png")
    hist = plot_score_histogram(scores, labels, folder / "scores.png", threshold=threshold)
    return {"scores_path": str(scores_path), "det_path": str(det), "histogram_path": str(hist)}


def format_metrics(name: str, metrics: dict[str, Any]) -> str:
    """One line a person reads: EER (%), both minDCFs, the trial count, and accuracy when measured."""
    if "eer" not in metrics:
        raise KeyError(f"metrics for {name} have no 'eer' (keys: {', '.join(sorted(metrics))})")
    parts = [f"{name}: EER {100.0 * float(metrics['eer']):.2f}%"]
    for key, label in (("min_dcf_0.01", "minDCF(0.01)"), ("min_dcf_0.05", "minDCF(0.05)")):
        if key in metrics:
            parts.append(f"{label} {float(metrics[key]):.4f}")
    if "trials" in metrics:
        parts.append(f"{int(metrics['trials'])} trials")
    if "threshold" in metrics:
        parts.append(f"EER threshold {float(metrics['threshold']):.4f}")
    if "accuracy_at_threshold" in metrics:
        parts.append(f"accuracy {100.0 * float(metrics['accuracy_at_threshold']):.2f}%")
    return " | ".join(parts)
