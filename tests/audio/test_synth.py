"""The toy corpus generator and the fbank-mean baseline."""

from __future__ import annotations

import csv
import wave
from pathlib import Path

import numpy as np
import pytest

from raysv.audio.synth import make_trials, speaker_voice, synthesize
from raysv.embedding.baseline import fbank_mean_embed_files, fbank_mean_embedding
from raysv.evaluation.metrics import compute_eer
from raysv.evaluation.scoring import cosine_scores

SMALL = dict(speakers=6, sessions=2, utterances=3, min_seconds=1.0, max_seconds=1.5, trials=40)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _meta(root: Path) -> list[dict[str, str]]:
    with (root / "meta.csv").open() as f:
        return list(csv.DictReader(f))


def _trials(root: Path) -> list[tuple[int, str, str]]:
    lines = (root / "trials.txt").read_text().splitlines()
    return [(int(a), b, c) for a, b, c in (line.split() for line in lines)]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("small")
    return out, synthesize(out, seed=0, **SMALL)


def test_layout_and_meta(small):
    out, summary = small
    rows = _meta(out)
    with (out / "meta.csv").open() as f:
        assert f.readline().strip() == "path,speaker,session,duration"
    assert len(rows) == 6 * 2 * 3 == summary["utterances"]
    assert {r["speaker"] for r in rows} == {f"id1000{i}" for i in range(6)}
    assert {r["session"] for r in rows} == {"s00", "s01"}
    wavs = sorted(str(p.relative_to(out / "wav")) for p in (out / "wav").rglob("*.wav"))
    assert wavs == sorted(r["path"] for r in rows)
    total = 0.0
    for r in rows:
        spk, sess, name = r["path"].split("/")
        assert (spk, sess) == (r["speaker"], r["session"]) and len(name) == len("00001.wav")
        with wave.open(str(out / "wav" / r["path"])) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            frames = w.getnframes()
            samples = np.frombuffer(w.readframes(frames), dtype="<i2")
        assert float(r["duration"]) == pytest.approx(frames / 16000, abs=1e-4)
        assert 1.0 - 1e-3 <= frames / 16000 <= 1.5 + 1e-3
        assert samples.std() > 100 and np.abs(samples).max() < 32767  # audible, not clipped
        total += frames / 16000
    assert summary["seconds"] == pytest.approx(total, abs=1e-2)
    assert summary["wall_seconds"] > 0


def test_trials_balanced_cross_session_unique(small):
    out, summary = small
    rows = {r["path"]: r for r in _meta(out)}
    trials = _trials(out)
    assert len(trials) == 40 == summary["trials"]
    assert sum(lab for lab, _, _ in trials) == 20 == summary["targets"]
    pairs = set()
    for lab, a, b in trials:
        assert a in rows and b in rows and a != b
        same_spk = rows[a]["speaker"] == rows[b]["speaker"]
        assert same_spk == bool(lab)
        if lab:
            assert rows[a]["session"] != rows[b]["session"]
        pairs.add(frozenset((a, b)))
    assert len(pairs) == len(trials)
    assert not summary["capped"]


def test_trials_capped_when_too_few_pairs(tmp_path):
    s = synthesize(tmp_path, speakers=2, sessions=2, utterances=1, min_seconds=0.5, max_seconds=0.5, trials=100)
    # Each speaker has exactly one cross-session pair: 2 targets, then as many non-targets.
    assert (s["trials"], s["targets"], s["nontargets"]) == (4, 2, 2)
    assert s["capped"] and "2 distinct" in s["note"]
    assert len(_trials(tmp_path)) == 4


def test_make_trials_rejection_path_matches_rules(monkeypatch):
    import raysv.audio.synth.corpus as synth

    monkeypatch.setattr(synth, "_ENUMERATE_LIMIT", 0)  # force rejection sampling
    spk = np.repeat(np.arange(30), 6)
    sess = np.tile(np.repeat(np.arange(3), 2), 30)
    # 30 × (15 - 3) = 360 distinct cross-session target pairs: 300 of them is a dense draw.
    rows, note = make_trials(spk, sess, 600, np.random.default_rng(1))
    assert note == "" and len(rows) == 600 and rows[:, 0].sum() == 300
    tar = rows[rows[:, 0] == 1]
    non = rows[rows[:, 0] == 0]
    assert np.all(spk[tar[:, 1]] == spk[tar[:, 2]]) and np.all(sess[tar[:, 1]] != sess[tar[:, 2]])
    assert np.all(spk[non[:, 1]] != spk[non[:, 2]])
    assert len({frozenset(p) for p in rows[:, 1:].tolist()}) == 600


def test_deterministic_across_jobs_and_seed_sensitive(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    synthesize(again, seed=0, jobs=2, **SMALL)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    synthesize(other, seed=1, **SMALL)
    a, b = _files(out), _files(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".wav"))


def test_voice_depends_on_global_speaker_number_only(tmp_path):
    kw = dict(sessions=2, utterances=1, min_seconds=0.5, max_seconds=0.6, trials=0, seed=3)
    synthesize(tmp_path / "a", speakers=3, **kw)
    synthesize(tmp_path / "b", speakers=2, speaker_offset=1, **kw)
    a, b = _files(tmp_path / "a" / "wav"), _files(tmp_path / "b" / "wav")
    assert set(b) == {k for k in a if not k.startswith("id10000")}
    assert all(a[k] == b[k] for k in b)
    # Training (0..39) and test (1000..1019) numbers give different voices.
    train = {round(speaker_voice(0, g).f0, 6) for g in range(40)}
    test = {round(speaker_voice(0, 1000 + g).f0, 6) for g in range(20)}
    assert len(train) == 40 and len(test) == 20 and not train & test


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(speakers=1), "speakers"),
        (dict(sessions=1), "sessions"),
        (dict(utterances=0), "utterances"),
        (dict(min_seconds=3.0, max_seconds=2.0), "max_seconds"),
        (dict(min_seconds=0.0), "min_seconds"),
        (dict(trials=-1), "trials"),
        (dict(speaker_offset=-5), "speaker_offset"),
        (dict(sample_rate=100), "sample_rate"),
        (dict(jobs=0), "jobs"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        synthesize(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_one_session_allowed_without_trials(tmp_path):
    s = synthesize(tmp_path, speakers=2, sessions=1, utterances=1, min_seconds=0.3, max_seconds=0.3, trials=0,
                   sample_rate=8000)
    assert s["trials"] == 0 and not (tmp_path / "trials.txt").exists()
    with wave.open(str(tmp_path / "wav" / "id10000" / "s00" / "00001.wav")) as w:
        assert (w.getframerate(), w.getnframes()) == (8000, 2400)


def test_fbank_mean_embedding_behaviour():
    sr = 16000
    t = np.arange(sr) / sr
    tone = 0.1 * np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    e = fbank_mean_embedding(tone, sr)
    assert e.shape == (160,) and e.dtype == np.float32
    mean, std = e[:80], e[80:]
    # Mel band centres of an 80-band HTK mel scale from 20 Hz to 8 kHz: the tone peaks in its band.
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    centres = 700 * (10 ** (np.linspace(mel(20), mel(8000), 82)[1:-1] / 2595) - 1)
    assert abs(int(np.argmax(mean)) - int(np.argmin(np.abs(centres - 1000.0)))) <= 1
    peak = int(np.argmax(mean))
    assert std[peak] < 0.5  # a stationary tone barely varies over time (edge frames aside)
    # Doubling the amplitude adds log(4) to the log power where the tone dominates; std unchanged.
    e2 = fbank_mean_embedding(2 * tone, sr)
    assert e2[peak] - e[peak] == pytest.approx(np.log(4.0), abs=1e-3)
    assert np.allclose(e2[80 + peak], std[peak], atol=1e-3)
    # int16 input is read as PCM full scale.
    pcm = np.round(tone * 32768).astype(np.int16)
    assert np.allclose(fbank_mean_embedding(pcm, sr), fbank_mean_embedding(pcm.astype(np.float32) / 32768, sr), atol=1e-5)


def _baseline_eer(root: Path) -> float:
    trials = _trials(root)
    utts = sorted({u for _, a, b in trials for u in (a, b)})
    index = {u: i for i, u in enumerate(utts)}
    emb = fbank_mean_embed_files([str(root / "wav" / u) for u in utts])
    assert emb.shape == (len(utts), 160)
    scores = cosine_scores(emb[[index[a] for _, a, _ in trials]], emb[[index[b] for _, _, b in trials]])
    return compute_eer(scores, np.array([lab for lab, _, _ in trials]))


def test_baseline_eer_in_band_and_speaker_is_learnable(tmp_path):
    """Average spectrum alone neither separates speakers nor fails outright; a linear
    projection learnt on other speakers beats it, so identity survives the channel."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    test_root = tmp_path / "test"
    synthesize(test_root, speakers=12, sessions=3, utterances=4, min_seconds=1.5, max_seconds=3.0, trials=1000,
               speaker_offset=1000, seed=0)
    eer = _baseline_eer(test_root)
    assert 0.10 < eer < 0.40

    train_root = tmp_path / "train"
    synthesize(train_root, speakers=24, sessions=3, utterances=3, min_seconds=1.5, max_seconds=3.0, trials=0, seed=0)
    meta = _meta(train_root)
    x = fbank_mean_embed_files([str(train_root / "wav" / r["path"]) for r in meta])
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(x, [r["speaker"] for r in meta])
    trials = _trials(test_root)
    utts = sorted({u for _, a, b in trials for u in (a, b)})
    index = {u: i for i, u in enumerate(utts)}
    z = lda.transform(fbank_mean_embed_files([str(test_root / "wav" / u) for u in utts]))
    z -= lda.transform(x).mean(axis=0)
    scores = cosine_scores(z[[index[a] for _, a, _ in trials]], z[[index[b] for _, _, b in trials]])
    learnt = compute_eer(scores, np.array([lab for lab, _, _ in trials]))
    assert learnt < 0.7 * eer
