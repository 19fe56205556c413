"""A toy corpus in the VoxCeleb layout: speakers, sessions, utterances and a balanced trial list.

The voices come from a ``style`` (:mod:`raysv.audio.synth.formant`, :mod:`raysv.audio.synth.tube`):
two synthesisers that make speaker identity in different ways, so that settings chosen on one
can be checked on the other.
"""

from __future__ import annotations

import csv
import multiprocessing
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from raysv.audio.synth import formant, tube

STYLES = {"formant": formant, "tube": tube}
_TAG_TRIALS = 14
_ENUMERATE_LIMIT = 2_000_000  # enumerate candidate pairs up to this count, else rejection-sample


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(samples.astype("<i2").tobytes())


def speaker_id(speaker: int) -> str:
    """VoxCeleb-style id of global speaker number ``speaker``."""
    return f"id{10000 + speaker:05d}"


def _render_session(task: tuple) -> list[tuple[str, str, str, int]]:
    """Write every utterance of one (speaker, session); returns meta rows."""
    wav_root, style, seed, speaker, session, utterances, min_s, max_s, sr = task
    render = STYLES[style].render_utterance
    cache: dict = {}
    rows = []
    for u in range(utterances):
        samples = render(seed, speaker, session, u, min_s, max_s, sr, cache)
        rel = f"{speaker_id(speaker)}/s{session:02d}/{u + 1:05d}.wav"
        _write_wav(Path(wav_root) / rel, samples, sr)
        rows.append((rel, speaker_id(speaker), f"s{session:02d}", len(samples)))
    return rows


def _choose_pairs(
    rng: np.random.Generator,
    count: int,
    available: int,
    enumerate_pairs: Callable[[], np.ndarray],
    draw: Callable[[int], Iterator[tuple[int, int]]],
) -> np.ndarray:
    """``count`` distinct unordered pairs, enumerated when feasible, else by rejection."""
    if count <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    if available <= _ENUMERATE_LIMIT:
        pairs = enumerate_pairs()
        return pairs[np.sort(rng.choice(len(pairs), size=count, replace=False))]
    seen: set[tuple[int, int]] = set()
    chosen: list[tuple[int, int]] = []
    while len(chosen) < count:
        for a, b in draw(2 * (count - len(chosen)) + 16):
            key = (min(a, b), max(a, b))
            if key not in seen:
                seen.add(key)
                chosen.append(key)
                if len(chosen) == count:
                    break
    return np.asarray(chosen, dtype=np.int64)


def make_trials(
    speakers: np.ndarray, sessions: np.ndarray, trials: int, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Balanced trials as ``(label, i, j)`` rows indexing the utterance arrays.

    Targets are always cross-session; no unordered pair repeats; enroll/test order is random.

    Returns the rows and a note when fewer distinct pairs existed than requested.
    """
    n = len(speakers)
    order = np.lexsort((sessions, speakers))
    spk_groups = np.split(order, np.flatnonzero(np.diff(speakers[order])) + 1)
    same_spk = sum(len(g) * (len(g) - 1) // 2 for g in spk_groups)
    same_sess = 0
    for g in spk_groups:
        _, cnt = np.unique(sessions[g], return_counts=True)
        same_sess += int(np.sum(cnt * (cnt - 1) // 2))
    tar_avail = same_spk - same_sess
    non_avail = n * (n - 1) // 2 - same_spk
    want_t, want_n = trials // 2, trials - trials // 2
    n_t = min(want_t, tar_avail)
    n_n = min(want_n, non_avail)
    note = ""
    if n_t < want_t or n_n < want_n:
        n_t = n_n = min(n_t, n_n)
        note = (f"only {tar_avail} distinct cross-session target pairs and {non_avail} non-target pairs exist; "
                f"wrote {2 * n_t} balanced trials instead of {trials}")

    def enum_targets() -> np.ndarray:
        out = []
        for g in spk_groups:
            i, j = np.triu_indices(len(g), 1)
            m = sessions[g][i] != sessions[g][j]
            out.append(np.stack([g[i][m], g[j][m]], axis=1))
        return np.concatenate(out)

    def draw_targets(k: int) -> Iterator[tuple[int, int]]:
        sizes = np.array([len(g) for g in spk_groups], dtype=np.float64)
        pick = rng.choice(len(spk_groups), size=k, p=sizes * (sizes - 1) / np.sum(sizes * (sizes - 1)))
        for s in pick:
            a, b = rng.choice(spk_groups[s], size=2, replace=False)
            if sessions[a] != sessions[b]:
                yield int(a), int(b)

    def enum_non() -> np.ndarray:
        i, j = np.triu_indices(n, 1)
        m = speakers[i] != speakers[j]
        return np.stack([i[m], j[m]], axis=1)

    def draw_non(k: int) -> Iterator[tuple[int, int]]:
        a, b = rng.integers(n, size=k), rng.integers(n, size=k)
        for x, y in zip(a, b):
            if speakers[x] != speakers[y]:
                yield int(x), int(y)

    tar = _choose_pairs(rng, n_t, tar_avail, enum_targets, draw_targets)
    non = _choose_pairs(rng, n_n, non_avail, enum_non, draw_non)
    rows = np.concatenate([np.column_stack([np.ones(len(tar), np.int64), tar]),
                           np.column_stack([np.zeros(len(non), np.int64), non])])
    rows = rows[rng.permutation(len(rows))]
    swap = rng.random(len(rows)) < 0.5
    rows[swap, 1], rows[swap, 2] = rows[swap, 2], rows[swap, 1].copy()
    return rows, note


def _validate(speakers: int, sessions: int, utterances: int, min_seconds: float, max_seconds: float,
              trials: int, speaker_offset: int, sample_rate: int, jobs: int, style: str) -> None:
    checks = [
        (style in STYLES, "style", style, f"one of {', '.join(STYLES)}"),
        (speakers >= 2, "speakers", speakers, "at least 2"),
        (sessions >= 1, "sessions", sessions, "at least 1"),
        (sessions >= 2 or trials == 0, "sessions", sessions, "at least 2 when trials > 0 (targets are cross-session)"),
        (utterances >= 1, "utterances", utterances, "at least 1"),
        (min_seconds >= 0.1, "min_seconds", min_seconds, "at least 0.1"),
        (max_seconds >= min_seconds, "max_seconds", max_seconds, f"at least min_seconds ({min_seconds})"),
        (max_seconds <= 600, "max_seconds", max_seconds, "at most 600"),
        (trials >= 0, "trials", trials, "non-negative"),
        (speaker_offset >= 0, "speaker_offset", speaker_offset, "non-negative"),
        (8000 <= sample_rate <= 48000, "sample_rate", sample_rate, "between 8000 and 48000"),
        (jobs >= 1, "jobs", jobs, "at least 1"),
    ]
    for ok, name, value, need in checks:
        if not ok:
            raise ValueError(f"synthesize: {name}={value!r} must be {need}")


def synthesize(
    out: str | Path,
    speakers: int = 40,
    sessions: int = 4,
    utterances: int = 8,
    min_seconds: float = 2.0,
    max_seconds: float = 5.0,
    seed: int = 0,
    trials: int = 4000,
    speaker_offset: int = 0,
    sample_rate: int = 16000,
    jobs: int = 1,
    style: str = "formant",
) -> dict:
    """Write a toy corpus to ``out``: ``wav/<speaker>/<session>/<nnnnn>.wav``, ``meta.csv``, ``trials.txt``.

    ``utterances`` is per session. Speaker traits depend only on ``seed``, the ``style`` and the
    global speaker number ``speaker_offset + i``, so corpora with disjoint number ranges share no
    voice. Output is byte-identical for a seed, whatever ``jobs``.
    """
    _validate(speakers, sessions, utterances, min_seconds, max_seconds, trials, speaker_offset, sample_rate, jobs,
              style)
    start = time.perf_counter()
    out = Path(out)
    wav_root = out / "wav"
    wav_root.mkdir(parents=True, exist_ok=True)
    tasks = [(str(wav_root), style, seed, speaker_offset + s, k, utterances, float(min_seconds), float(max_seconds),
              sample_rate) for s in range(speakers) for k in range(sessions)]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
            results = pool.map(_render_session, tasks, chunksize=1)
    else:
        results = [_render_session(t) for t in tasks]
    rows = [r for res in results for r in res]

    with (out / "meta.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "speaker", "session", "duration"])
        for rel, spk, sess, ns in rows:
            w.writerow([rel, spk, sess, f"{ns / sample_rate:.4f}"])

    n_target = 0
    note = ""
    if trials > 0:
        spk_idx = np.repeat(np.arange(speakers), sessions * utterances)
        sess_idx = np.tile(np.repeat(np.arange(sessions), utterances), speakers)
        rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_TRIALS, speaker_offset]))
        table, note = make_trials(spk_idx, sess_idx, trials, rng)
        n_target = int(table[:, 0].sum())
        with (out / "trials.txt").open("w") as f:
            f.writelines(f"{lab} {rows[a][0]} {rows[b][0]}\n" for lab, a, b in table)
        n_trials = len(table)
    else:
        n_trials = 0
    seconds = sum(r[3] for r in rows) / sample_rate
    wall = time.perf_counter() - start
    return {
        "out": str(out),
        "style": style,
        "speakers": speakers,
        "sessions": sessions,
        "utterances": len(rows),
        "seconds": round(seconds, 3),
        "trials": n_trials,
        "targets": n_target,
        "nontargets": n_trials - n_target,
        "capped": bool(note),
        "note": note,
        "wall_seconds": round(wall, 3),
        "realtime_factor": round(seconds / wall, 1) if wall > 0 else float("inf"),
    }
