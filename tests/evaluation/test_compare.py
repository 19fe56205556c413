"""The paired bootstrap of two evaluations: intervals that resolve a real difference and not noise, bad input named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from raysv.errors import InputError
from raysv.evaluation.compare import compare_scores, format_comparison, paired_bootstrap, read_scores, trial_groups


def _trials(speakers: int = 30, per: int = 40, seed: int = 0):
    """Trials grouped by enrolment speaker, half targets, and a model's score noise around the label."""
    rng = np.random.default_rng(seed)
    enroll = np.repeat([f"id{s:02d}/v{s}/1.wav" for s in range(speakers)], per)
    test = np.array([f"id{(s + 50):02d}/x/{i}.wav" for s in range(speakers) for i in range(per)])
    labels = np.tile(np.arange(per) % 2, speakers)
    return rng, enroll, test, labels


def _eer_sklearn(scores, labels) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    i = np.nanargmin(np.abs((1 - tpr) - fpr))
    return float(((1 - tpr[i]) + fpr[i]) / 2)


def _write(path: Path, scores, labels, enroll, test) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{s:.6f} {y} {e} {t}\n" for s, y, e, t in zip(scores, labels, enroll, test)))
    return path


def test_a_clearly_better_model_is_resolved_and_a_rescored_one_is_not() -> None:
    rng, enroll, _, labels = _trials()
    groups = trial_groups(enroll)
    assert groups.max() + 1 == 30
    weak = labels + rng.normal(0, 0.8, size=labels.size)
    strong = labels + rng.normal(0, 0.4, size=labels.size)
    better = paired_bootstrap(weak, strong, labels, groups, resamples=300)
    assert better["eer_a"] == pytest.approx(_eer_sklearn(weak, labels), abs=2e-3)
    assert better["eer_b"] == pytest.approx(_eer_sklearn(strong, labels), abs=2e-3)
    assert better["high"] < 0 < better["eer_a"] - better["eer_b"]  # lower EER, beyond the list's noise
    # the same model scored twice (its noise redrawn): the interval holds 0
    again = labels + rng.normal(0, 0.8, size=labels.size)
    same = paired_bootstrap(weak, again, labels, groups, resamples=300)
    assert same["low"] < 0 < same["high"]
    identical = paired_bootstrap(weak, weak, labels, groups, resamples=50)
    assert identical["difference"] == identical["low"] == identical["high"] == 0.0
    swapped = paired_bootstrap(strong, weak, labels, groups, resamples=300)
    assert swapped["low"] == pytest.approx(-better["high"]) and swapped["high"] == pytest.approx(-better["low"])


def test_speakers_are_resampled_not_trials() -> None:
    """Trials of one speaker move together: a model bad on a few speakers only has a wider interval
    when speakers are resampled than when trials (here: enrolment utterances) are."""
    rng, enroll, _, labels = _trials(speakers=20, per=60)
    groups = trial_groups(enroll)
    a = labels + rng.normal(0, 0.6, size=labels.size)
    b = a.copy()
    hard = np.isin(groups, [0, 1, 2])
    b[hard] = labels[hard] + rng.normal(0, 3.0, size=int(hard.sum()))  # b fails on 3 speakers of 20
    by_speaker = paired_bootstrap(a, b, labels, groups, resamples=300)
    per_trial = paired_bootstrap(a, b, labels, np.arange(labels.size), resamples=300)
    assert by_speaker["sd"] > 1.5 * per_trial["sd"]
    assert by_speaker["difference"] == per_trial["difference"] > 0


def test_compare_command_reads_two_evaluations(tmp_path: Path) -> None:
    rng, enroll, test, labels = _trials()
    a = _write(tmp_path / "r0" / "toy" / "scores.txt", labels + rng.normal(0, 0.8, labels.size), labels, enroll, test)
    _write(tmp_path / "r1" / "toy" / "scores.txt", labels + rng.normal(0, 0.4, labels.size), labels, enroll, test)
    done = subprocess.run([sys.executable, "-m", "raysv.cli", "compare", str(a), str(tmp_path / "r1" / "toy"),
                           "--resamples", "200", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["high"] < 0 and result["groups"] == 30 and result["by"] == "speaker"
    assert result == compare_scores(a, tmp_path / "r1" / "toy", resamples=200)
    assert format_comparison(result).endswith("b is better")


def test_mismatched_or_malformed_scores_are_named(tmp_path: Path) -> None:
    rng, enroll, test, labels = _trials(speakers=4, per=10)
    a = _write(tmp_path / "a.txt", rng.normal(size=labels.size), labels, enroll, test)
    other = test.copy()
    other[7] = "id99/z/9.wav"
    b = _write(tmp_path / "b.txt", rng.normal(size=labels.size), labels, enroll, other)
    with pytest.raises(InputError, match=r"line 8 differs"):
        compare_scores(a, b)
    short = _write(tmp_path / "c.txt", rng.normal(size=10), labels[:10], enroll[:10], test[:10])
    with pytest.raises(InputError, match="40 trials.*10"):
        compare_scores(a, short)
    bad = tmp_path / "bad.txt"
    bad.write_text("0.5 1 a.wav\n")
    with pytest.raises(InputError, match=r"bad.txt:1: expected"):
        read_scores(bad)
    with pytest.raises(InputError, match="no AS-norm scores"):
        compare_scores(a, a, asnorm=True)
    with pytest.raises(InputError, match=r"level must be in \(0, 1\), got 1.5"):
        compare_scores(a, a, level=1.5)
    done = subprocess.run([sys.executable, "-m", "raysv.cli", "compare", str(a), str(b)], capture_output=True, text=True)
    assert done.returncode == 2 and "line 8 differs" in done.stderr and "Traceback" not in done.stderr
