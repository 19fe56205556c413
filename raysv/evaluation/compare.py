"""Whether one model beats another on the same trials beyond the trial list's own noise.

A list of a few dozen speakers gives an EER that moves by a point or more with the choice of
speakers alone, so "round 2 scored 0.5 points lower than round 1" says little by itself. The
paired bootstrap resamples the enrolment speakers (with replacement), scores both models on
the same resampled trials and reads the spread of the EER difference: an interval that
excludes 0 is a difference the list can resolve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysv.errors import InputError
from raysv.evaluation.metrics import compute_eer

SCORES_FILE = "scores.txt"
GROUPINGS = ("speaker", "enroll")
TRIAL_EERS = 2e7
"""Bootstrap work when the resamples are left to the list's size: resamples × trials, so that a pair of models
costs about a second on 4,000 trials (1,000 resamples) and a minute on VoxCeleb1-H (200, the fewest)."""


@dataclass
class ScoredTrials:
    """One model's ``scores.txt``: raw score, label, enrolment and test utterance per trial (AS-norm score if any)."""

    path: Path
    scores: np.ndarray
    labels: np.ndarray
    enroll: np.ndarray
    test: np.ndarray
    asnorm: np.ndarray | None


def read_scores(path: str | Path) -> ScoredTrials:
    """``scores.txt`` of an evaluation (the file, or the folder of a trial list holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (an evaluation writes <stage>/<trial list>/{SCORES_FILE})")
    scores, labels, enroll, test, asnorm = [], [], [], [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) not in (4, 5):
            raise InputError(f"{path}:{n}: expected 'score label enroll test [asnorm]', got {line!r}")
        try:
            scores.append(float(parts[0]))
            labels.append(int(parts[1]))
            if len(parts) == 5:
                asnorm.append(float(parts[4]))
        except ValueError as err:
            raise InputError(f"{path}:{n}: {err}") from err
        enroll.append(parts[2])
        test.append(parts[3])
    if not scores:
        raise InputError(f"{path} holds no trials")
    if asnorm and len(asnorm) != len(scores):
        raise InputError(f"{path}: some lines have an AS-norm score and some do not")
    return ScoredTrials(path, np.asarray(scores), np.asarray(labels, dtype=np.int64), np.asarray(enroll),
                        np.asarray(test), np.asarray(asnorm) if asnorm else None)


def trial_groups(enroll: np.ndarray, by: str = "speaker") -> np.ndarray:
    """The unit the bootstrap resamples, per trial: the enrolment speaker (the first path component,
    VoxCeleb layout) or the enrolment utterance itself."""
    if by not in GROUPINGS:
        raise InputError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
    keys = [e.split("/", 1)[0] if by == "speaker" else e for e in enroll]
    return np.unique(np.asarray(keys), return_inverse=True)[1].reshape(-1)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    resamples: int = 1000,
    level: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """EER of ``a`` and ``b`` (scores of the same trials), their difference b − a and ratio b / a, each with
    its bootstrap interval.

    Each resample draws as many groups as there are, with replacement, and keeps all their
    trials for both models; a draw with no target or no non-target trial is drawn again.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups)
    if not (a.shape == b.shape == labels.shape == groups.shape):
        raise ValueError(f"scores a {a.shape}, b {b.shape}, labels {labels.shape} and groups {groups.shape} differ")
    if resamples < 1:
        raise InputError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise InputError(f"level must be in (0, 1), got {level}")
    order = np.argsort(groups, kind="stable")
    ids, starts = np.unique(groups[order], return_index=True)
    members = np.split(order, starts[1:])
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    ratios = np.empty(resamples)
    done = tries = 0
    while done < resamples:
        tries += 1
        if tries > 20 * resamples:
            raise InputError("resampled trials keep lacking targets or non-targets: too few groups to bootstrap "
                             "(--by enroll resamples enrolment utterances instead of speakers)")
        rows = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        y = labels[rows]
        if y.min() == y.max():
            continue
        ea, eb = compute_eer(a[rows], y), compute_eer(b[rows], y)
        diffs[done], ratios[done] = eb - ea, eb / ea if ea > 0 else np.inf
        done += 1
    eer_a, eer_b = compute_eer(a, labels), compute_eer(b, labels)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail])
    ratio_low, ratio_high = np.percentile(ratios, [tail, 100.0 - tail])
    return {"eer_a": eer_a, "eer_b": eer_b, "difference": eer_b - eer_a, "low": float(low), "high": float(high),
            "sd": float(diffs.std()), "ratio": eer_b / eer_a if eer_a > 0 else float("inf"),
            "ratio_low": float(ratio_low), "ratio_high": float(ratio_high),
            "level": level, "groups": int(len(ids)), "resamples": int(resamples)}


def compare_scores(a: str | Path, b: str | Path, *, by: str = "speaker", asnorm: bool = False,
                   resamples: int | None = 1000, level: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """:func:`paired_bootstrap` of two evaluations of the same trial list (``scores.txt`` files or their folders).

    ``resamples=None``: as many as :data:`TRIAL_EERS` allows for the list's size (200 to 1,000).
    """
    first, second = read_scores(a), read_scores(b)
    if resamples is None:
        resamples = int(min(max(TRIAL_EERS / len(first.labels), 200), 1000))
    if len(first.labels) != len(second.labels):
        raise InputError(f"{first.path} has {len(first.labels)} trials, {second.path} {len(second.labels)}: "
                         "compare evaluations of the same trial list")
    same = (first.labels == second.labels) & (first.enroll == second.enroll) & (first.test == second.test)
    if not same.all():
        n = int(np.argmin(same)) + 1
        raise InputError(f"line {n} differs between {first.path} and {second.path}: "
                         "compare evaluations of the same trial list")
    pick = []
    for scored in (first, second):
        if asnorm and scored.asnorm is None:
            raise InputError(f"{scored.path} has no AS-norm scores (the evaluation ran without eval.asnorm)")
        pick.append(scored.asnorm if asnorm else scored.scores)
    out = paired_bootstrap(pick[0], pick[1], first.labels, trial_groups(first.enroll, by), resamples=resamples,
                           level=level, seed=seed)
    out.update({"a": str(first.path), "b": str(second.path), "by": by, "scoring": "asnorm" if asnorm else "raw"})
    return out


def format_comparison(result: dict[str, Any]) -> str:
    """One line a person reads: both EERs, the change and its interval, and what the list can tell."""
    pct = 100.0
    low, high = pct * result["low"], pct * result["high"]
    if high < 0:
        verdict = "b is better"
    elif low > 0:
        verdict = "a is better"
    else:
        verdict = "no difference this list can resolve"
    return (f"EER {pct * result['eer_a']:.2f} % -> {pct * result['eer_b']:.2f} % "
            f"({pct * result['difference']:+.2f} points; {round(100 * result['level'])} % interval "
            f"{low:+.2f} to {high:+.2f}, {result['groups']} {result['by']}s resampled "
            f"{result['resamples']} times): {verdict}")
