"""Evaluate an embedder on a VoxCeleb-format trial list: embed each utterance once, score, measure.

The embedder is either the untrained ``fbank-mean`` baseline (computed in this
process) or a checkpoint, embedded by the Ray actor pool of
:mod:`raysv.embedding.pool` so that VoxCeleb1-E/H's 145k utterances run in parallel.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raysv.audio.io import SAMPLE_RATE, read_audio
from raysv.data.trials import Trials, read_trials, usable_trials
from raysv.embedding.baseline import fbank_mean_embedding
from raysv.config import check_choice, check_non_negative, check_positive
from raysv.embedding.core import TrialProtocol, trial_vector
from raysv.evaluation.compare import SCORES_FILE
from raysv.evaluation.scoring import decide, evaluate_scores, score_trials
from raysv.runtime import RayConfig, ensure_ray, on_terminal

log = logging.getLogger(__name__)

EMBEDDERS = ("fbank-mean", "checkpoint")


@dataclass
class AsNormConfig:
    top_n: int | None = None  # None disables AS-norm
    cohort_size: int = 20000  # training utterances drawn (eval.seed) as the cohort; only these are embedded
    # for a model no extraction stage embedded (the last round, the large-margin stage)


@dataclass
class EvalConfig(TrialProtocol):
    """``eval``: how trial files are embedded and scored (:class:`TrialProtocol`), and AS-norm.

    Raw cosine figures are always reported; with ``asnorm.top_n`` the AS-normalised ones go beside them.
    """

    asnorm: AsNormConfig = field(default_factory=AsNormConfig)
    skip_bad: bool = False  # drop the trials of unusable files (named in a warning) instead of stopping

    def protocol(self) -> TrialProtocol:
        return TrialProtocol(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrialProtocol)})

    def validate(self, prefix: str = "eval") -> None:
        check_choice(f"{prefix}.positions", self.positions, ("even", "random"))
        check_choice(f"{prefix}.fusion", self.fusion, ("score", "embedding"))
        check_non_negative(f"{prefix}.crops", self.crops)
        check_positive(f"{prefix}.crop_seconds", self.crop_seconds)
        check_positive(f"{prefix}.max_seconds", self.max_seconds)
        check_positive(f"{prefix}.asnorm.top_n", self.asnorm.top_n)


METRICS = ("eer", "min_dcf_0.01", "min_dcf_0.05")


def _fbank_mean_embeddings(files: dict[str, Path], protocol: TrialProtocol) -> dict[str, np.ndarray]:
    """The baseline's trial vector of every file, in this process, with a progress bar."""
    from tqdm.auto import tqdm

    def embed_fn(batch: np.ndarray) -> np.ndarray:
        return np.stack([fbank_mean_embedding(w, SAMPLE_RATE) for w in batch])

    out: dict[str, np.ndarray] = {}
    bar = tqdm(files.items(), desc="fbank-mean", unit="utt", total=len(files), disable=not on_terminal())
    for key, path in bar:
        wave = read_audio(path, SAMPLE_RATE)
        if wave.size == 0:
            raise ValueError(f"{path}: the audio is empty")
        out[key] = trial_vector(embed_fn, wave, protocol)
    return out


def evaluate_trials(
    trials: str | Path | Trials,
    audio_root: str | Path,
    *,
    embedder: str = "fbank-mean",
    checkpoint: str | Path | None = None,
    protocol: TrialProtocol | None = None,
    cohort: np.ndarray | None = None,
    top_n: int | None = None,
    plots_dir: str | Path | None = None,
    threshold: float | None = None,
    embeddings: dict[str, np.ndarray] | None = None,
    skip_bad: bool = False,
    ray: RayConfig | None = None,
) -> dict[str, Any]:
    """EER, minDCF (p 0.01, 0.05), the EER threshold and the trial count of one trial list.

    A ``checkpoint``, when given, is what gets evaluated (``embedder`` is then
    ``"checkpoint"``); otherwise ``embedder`` must be ``"fbank-mean"``. Files are embedded
    and scored under ``protocol`` (default: whole files, cosine). With a ``cohort`` the
    AS-normalised figures go beside the raw ones (``eer_asnorm``, …) and ``scoring`` says
    which of the two ``threshold``/``accuracy_at_threshold`` refer to (what ``verify`` uses).
    With ``threshold`` the accuracy of accepting ``score >= threshold`` is added; with
    ``plots_dir`` ``det.png``, ``scores.png`` and ``scores.txt`` are written. ``embeddings``
    (trial vectors per utterance of the list) skips embedding: several lists embedded at once.
    A checkpoint's files are embedded by Ray actors, on the cluster ``ray`` describes, joined
    or started only once every file of the list has been checked.
    """
    protocol = protocol or TrialProtocol(crops=0)
    if checkpoint is not None:
        embedder = "checkpoint"
    if embedder not in EMBEDDERS:
        raise ValueError(f"unknown embedder {embedder!r}; expected one of {', '.join(EMBEDDERS)}")
    if embedder == "checkpoint" and checkpoint is None:
        raise ValueError("embedder 'checkpoint' needs checkpoint=<folder>")
    if protocol.crops < 0:
        raise ValueError(f"crops must be >= 0, got {protocol.crops}")
    if top_n is not None and cohort is None:
        raise ValueError("top_n is set but no AS-norm cohort was given")
    trial_list = trials if isinstance(trials, Trials) else read_trials(trials)
    if embeddings is not None:
        files = {u: Path(audio_root) / u for u in trial_list.utterances()}
    else:
        trial_list, files = usable_trials(trial_list, audio_root, skip_bad)

    start = time.perf_counter()
    if embeddings is not None:
        missing = sorted(set(files) - set(embeddings))
        if missing:
            raise ValueError(f"{len(missing)} utterance(s) of {trials} have no embedding, e.g. {missing[0]}")
    elif embedder == "fbank-mean":
        embeddings = _fbank_mean_embeddings(files, protocol)
    else:
        from raysv.embedding.pool import embed_files

        ensure_ray(ray)
        embeddings = embed_files(checkpoint, files, protocol=protocol)
    embed_seconds = time.perf_counter() - start

    labels = trial_list.labels.astype(np.int64)
    raw = score_trials(embeddings, trial_list.enroll, trial_list.test, cosine=protocol.cosine)
    metrics: dict[str, Any] = evaluate_scores(raw, labels)
    scores = raw
    if cohort is not None:
        scores = score_trials(embeddings, trial_list.enroll, trial_list.test, cohort=cohort, top_n=top_n,
                              cosine=protocol.cosine)
        metrics.update({f"{k}_asnorm": v for k, v in evaluate_scores(scores, labels).items() if k != "trials"})
    metrics["scoring"] = "asnorm" if cohort is not None else "raw"
    metrics["utterances"] = len(files)
    metrics["embedder"] = str(checkpoint) if checkpoint is not None else embedder
    metrics["embed_seconds"] = round(embed_seconds, 3)
    used = metrics["threshold_asnorm"] if cohort is not None else metrics["threshold"]
    if threshold is not None:
        metrics["accuracy_at_threshold"] = float(np.mean(decide(scores, float(threshold)) == labels.astype(bool)))
        metrics["given_threshold"] = float(threshold)
    if plots_dir is not None:
        metrics.update(_write_outputs(Path(plots_dir), raw, scores if cohort is not None else None, labels,
                                      trial_list.enroll, trial_list.test,
                                      threshold if threshold is not None else used))
    log.debug(format_metrics(Path(trial_list.path).name, metrics))
    return metrics


def _write_outputs(
    folder: Path, raw: np.ndarray, normalised: np.ndarray | None, labels: np.ndarray, enroll: list[str],
    test: list[str], threshold: float,
) -> dict[str, str]:
    """``scores.txt`` (``score label enroll test``, plus the AS-norm score last when there is one), the DET
    curve and the score histogram of the scores decisions use (AS-norm when on)."""
    from raysv.evaluation.plots import plot_det, plot_score_histogram

    folder.mkdir(parents=True, exist_ok=True)
    scores_path = folder / SCORES_FILE
    with scores_path.open("w") as f:
        for i, (s, lab, e, t) in enumerate(zip(raw, labels, enroll, test)):
            extra = f" {float(normalised[i]):.6f}" if normalised is not None else ""
            f.write(f"{float(s):.6f} {int(lab)} {e} {t}{extra}\n")
    used = normalised if normalised is not None else raw
    det = plot_det(used, labels, folder / "det.png")
    hist = plot_score_histogram(used, labels, folder / "scores.png", threshold=threshold)
    return {"scores_path": str(scores_path), "det_path": str(det), "histogram_path": str(hist)}


def format_metrics(name: str, metrics: dict[str, Any]) -> str:
    """One line a person reads: EER (%), both minDCFs (AS-norm beside when measured), the trial count, accuracy."""
    if "eer" not in metrics:
        raise KeyError(f"metrics for {name} have no 'eer' (keys: {', '.join(sorted(metrics))})")

    def pair(key: str, scale: float, fmt: str) -> str:
        text = format(scale * float(metrics[key]), fmt)
        if f"{key}_asnorm" in metrics:
            text += f" (AS-norm {format(scale * float(metrics[key + '_asnorm']), fmt)})"
        return text

    parts = [f"{name}: EER {pair('eer', 100.0, '.2f')}%"]
    for key, label in (("min_dcf_0.01", "minDCF(0.01)"), ("min_dcf_0.05", "minDCF(0.05)")):
        if key in metrics:
            parts.append(f"{label} {pair(key, 1.0, '.4f')}")
    if "trials" in metrics:
        parts.append(f"{int(metrics['trials'])} trials")
    used = "threshold_asnorm" if metrics.get("scoring") == "asnorm" else "threshold"
    if used in metrics:
        parts.append(f"EER threshold {float(metrics[used]):.4f}{' (AS-norm)' if used != 'threshold' else ''}")
    if "accuracy_at_threshold" in metrics:
        parts.append(f"accuracy {100.0 * float(metrics['accuracy_at_threshold']):.2f}%")
    return " | ".join(parts)
