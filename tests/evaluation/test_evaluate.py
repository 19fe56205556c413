"""Trial evaluation and the inference API agree with direct computations of the same scores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import lfilter

from raysv.artifacts.checkpoint import read_model_json, save_model, write_model_json
from raysv.embedding.baseline import fbank_mean_embedding
from raysv.embedding.core import TrialProtocol
from raysv.evaluation.evaluate import evaluate_trials, format_metrics
from raysv.evaluation.metrics import compute_eer, compute_min_dcf
from raysv.errors import InputError
from raysv.inference import load_model
from raysv.models.ecapa import ECAPAEncoder

SR = 16000
SPEAKERS = 4
UTTERANCES = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Speakers as fixed resonant filters over noise, with per-utterance channel noise: a non-trivial EER."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(11)
    utts, speakers = [], []
    for s in range(SPEAKERS):
        pole = 0.9 * np.exp(1j * np.pi * (0.1 + 0.2 * s))
        a = np.real(np.poly([pole, np.conj(pole)]))
        for u in range(UTTERANCES):
            n = int(SR * (0.8 + 0.3 * u))
            voiced = lfilter([1.0], a, rng.standard_normal(n))
            gain, noise = rng.uniform(0.3, 1.0), rng.uniform(0.2, 1.0)
            wave = voiced / np.abs(voiced).max() * 0.4 * gain + 0.15 * noise * rng.standard_normal(n)
            rel = f"id{s:02d}/utt{u}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, np.clip(wave, -1, 1).astype(np.float32), SR, subtype="PCM_16")
            utts.append(rel)
            speakers.append(s)
    pairs = itertools.combinations(range(len(utts)), 2)
    lines = [f"{int(speakers[i] == speakers[j])} {utts[i]} {utts[j]}" for i, j in pairs]
    trials = root / "trials.txt"
    trials.write_text("\n".join(lines) + "\n")
    return root, trials, [line.split() for line in lines]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = save_model(tmp_path_factory.mktemp("ckpt"), ECAPAEncoder(channels=32, mfa_channels=96, embed_dim=16))
    meta = read_model_json(folder)
    meta["eval"] = {"crops": 2, "crop_seconds": 0.5, "max_seconds": 30.0, "seed": 0, "positions": "even",
                    "fusion": "score"}
    write_model_json(folder, meta)
    return folder


def _direct_fbank_scores(root, rows):
    cache = {}

    def emb(rel):
        if rel not in cache:
            wave, _ = sf.read(root / rel, dtype="float32")
            e = fbank_mean_embedding(wave, SR).astype(np.float64)
            cache[rel] = e / np.linalg.norm(e)
        return cache[rel]

    scores = np.array([emb(e) @ emb(t) for _, e, t in rows])
    labels = np.array([int(lab) for lab, _, _ in rows])
    return scores, labels


def test_fbank_mean_matches_direct_computation(corpus, tmp_path):
    root, trials, rows = corpus
    scores, labels = _direct_fbank_scores(root, rows)
    threshold = float(np.median(scores))
    result = evaluate_trials(trials, root, plots_dir=tmp_path / "plots", threshold=threshold)
    eer = compute_eer(scores, labels)
    assert 0.0 < eer < 0.5  # the check below is meaningful: neither perfect nor chance
    assert result["eer"] == pytest.approx(eer, abs=1e-6)
    assert result["min_dcf_0.01"] == pytest.approx(compute_min_dcf(scores, labels, 0.01), abs=1e-6)
    assert result["min_dcf_0.05"] == pytest.approx(compute_min_dcf(scores, labels, 0.05), abs=1e-6)
    assert result["trials"] == len(rows)
    assert result["accuracy_at_threshold"] == pytest.approx(np.mean((scores >= threshold) == labels.astype(bool)))
    written = [line.split() for line in (tmp_path / "plots" / "scores.txt").read_text().splitlines()]
    assert [w[1:] for w in written] == rows
    np.testing.assert_allclose([float(w[0]) for w in written], scores, atol=1e-5)
    for name in ("det.png", "scores.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = format_metrics("toy", result)
    assert f"EER {100 * eer:.2f}%" in line and "minDCF(0.01)" in line


def test_given_embeddings_are_scored_and_must_cover_the_list(corpus):
    root, trials, rows = corpus
    scores, labels = _direct_fbank_scores(root, rows)
    utts = {u for _, e, t in rows for u in (e, t)}
    given = {}
    for utt in utts:
        wave, _ = sf.read(root / utt, dtype="float32")
        given[utt] = fbank_mean_embedding(wave, SR)
    result = evaluate_trials(trials, root, embeddings=given)
    assert result["eer"] == pytest.approx(compute_eer(scores, labels), abs=1e-6)
    missing = sorted(utts)[0]
    del given[missing]
    with pytest.raises(ValueError, match="no embedding") as err:
        evaluate_trials(trials, root, embeddings=given)
    assert missing in str(err.value)


def test_missing_trial_files_are_named(corpus, tmp_path):
    root, _, rows = corpus
    trials = tmp_path / "trials.txt"
    trials.write_text(f"1 {rows[0][1]} id09/ghost_a.wav\n0 {rows[0][1]} id09/ghost_b.wav\n")
    with pytest.raises(InputError, match=r"ghost_a.wav: no such file") as err:
        evaluate_trials(trials, root)
    assert "ghost_b.wav" in str(err.value) and "2 of 3 files" in str(err.value)
    with pytest.raises(ValueError, match="unknown embedder"):
        evaluate_trials(corpus[1], root, embedder="mfcc")


def test_checkpoint_evaluation_matches_speaker_model(ray_session, corpus, checkpoint, tmp_path):
    """Ray actors (embed_files) and the in-process SpeakerModel give the same multi-crop, score-fused scores."""
    root, trials, rows = corpus
    protocol = TrialProtocol(crops=2, crop_seconds=0.5, max_seconds=30.0, seed=0, positions="even", fusion="score")
    result = evaluate_trials(trials, root, checkpoint=checkpoint, protocol=protocol, plots_dir=tmp_path)
    model = load_model(checkpoint, device="cpu")
    assert model.protocol == protocol
    emb = {rel: model.trial_vector(root / rel) for rel in {r[1] for r in rows} | {r[2] for r in rows}}
    direct = np.array([emb[e] @ emb[t] for _, e, t in rows])
    labels = np.array([int(r[0]) for r in rows])
    written = np.array([float(line.split()[0]) for line in (tmp_path / "scores.txt").read_text().splitlines()])
    np.testing.assert_allclose(written, direct, atol=1e-5)
    assert result["eer"] == pytest.approx(compute_eer(direct, labels), abs=1e-6)


def test_speaker_model_embedding_and_verify(corpus, checkpoint, tmp_path):
    root, _, rows = corpus
    model = load_model(checkpoint, device="cpu")
    # Without crops the embedding is the normalised encoder output of the whole utterance.
    meta = read_model_json(checkpoint)
    plain = tmp_path / "plain"
    save_model(plain, model.encoder, {k: v for k, v in meta.items() if k != "eval"})
    plain_model = load_model(plain, device="cpu")
    wave, _ = sf.read(root / rows[0][1], dtype="float32")
    with torch.no_grad():
        ref = model.encoder(torch.from_numpy(wave)[None])[0].numpy()
    np.testing.assert_allclose(plain_model.embed(wave), ref / np.linalg.norm(ref), atol=1e-5)
    np.testing.assert_allclose(plain_model.embed(root / rows[0][1]), ref / np.linalg.norm(ref), atol=1e-5)
    # A single file's embedding is its whole length's; the trial vector adds the evaluation's crops,
    # deterministically: the same audio gives the same vector, by path or by array.
    np.testing.assert_allclose(model.embed(wave), plain_model.embed(wave), atol=1e-6)
    np.testing.assert_allclose(model.trial_vector(root / rows[0][1]), model.trial_vector(wave), atol=1e-6)
    assert model.trial_vector(wave).shape == (2 * model.embed_dim,)

    with pytest.raises(ValueError, match="threshold="):
        model.verify(wave, wave)
    a, b, c = (root / rows[0][1]), (root / rows[0][2]), (root / rows[-1][2])
    s_ab, s_ac = model.score(a, b), model.score(a, c)
    threshold = (s_ab + s_ac) / 2
    stored = load_model(save_model(tmp_path / "stored", model.encoder, {**meta, "threshold": threshold}), device="cpu")
    v_ab, v_ac = stored.verify(a, b), stored.verify(a, c)
    assert v_ab == (pytest.approx(s_ab, abs=1e-6), s_ab >= threshold)
    assert v_ac == (pytest.approx(s_ac, abs=1e-6), s_ac >= threshold)
    assert v_ab[1] != v_ac[1]
    assert stored.verify(a, c, threshold=-2.0)[1] is True


def test_speaker_model_asnorm(corpus, checkpoint, tmp_path):
    root, _, rows = corpus
    rng = np.random.default_rng(2)
    cohort = rng.standard_normal((20, 16)).astype(np.float32)
    folder = tmp_path / "asnorm"
    base = load_model(checkpoint, device="cpu")
    whole_files = {**base.meta["eval"], "crops": 0}  # cosines of whole-file embeddings, AS-normalised
    save_model(folder, base.encoder, {**base.meta, "eval": whole_files, "cohort": "cohort.npy", "asnorm_top_n": 5})
    np.save(folder / "cohort.npy", cohort)
    model = load_model(folder, device="cpu")
    a, b = root / rows[0][1], root / rows[5][2]
    ea, eb = model.embed(a), model.embed(b)
    coh = cohort / np.linalg.norm(cohort, axis=1, keepdims=True)

    def stats(e):
        top = np.sort(coh @ e)[-5:]
        return top.mean(), top.std()

    raw = float(ea @ eb)
    (ma, sa), (mb, sb) = stats(ea), stats(eb)
    expected = 0.5 * ((raw - ma) / sa + (raw - mb) / sb)
    assert model.score(a, b) == pytest.approx(expected, abs=1e-4)
    assert model.score(a, b) != pytest.approx(raw, abs=1e-3)


def test_asnorm_figures_go_beside_the_raw_ones(corpus):
    """With a cohort, the raw cosine figures stay the headline and the AS-norm ones are added beside them."""
    root, trials, rows = corpus
    raw = evaluate_trials(trials, root)
    cohort = np.random.default_rng(4).standard_normal((30, 160)).astype(np.float32)
    both = evaluate_trials(trials, root, cohort=cohort, top_n=10)
    assert both["eer"] == pytest.approx(raw["eer"]) and both["threshold"] == pytest.approx(raw["threshold"])
    assert both["scoring"] == "asnorm" and raw["scoring"] == "raw"
    for key in ("eer", "min_dcf_0.01", "min_dcf_0.05", "threshold"):
        assert f"{key}_asnorm" in both and f"{key}_asnorm" not in raw
    assert both["threshold_asnorm"] != pytest.approx(both["threshold"])
    assert "(AS-norm" in format_metrics("toy", both)


def test_unusable_trial_files_are_all_named_before_embedding_or_skipped(corpus, tmp_path):
    """Empty, corrupt and too-short files: one error naming each, or --skip-bad dropping their trials."""
    root, trials, rows = corpus
    bad_root = tmp_path / "audio"
    import shutil

    shutil.copytree(root, bad_root)
    (bad_root / rows[0][1]).write_bytes(b"")  # empty
    (bad_root / rows[0][2]).write_bytes(b"RIFF not really a wav file")  # corrupt header
    sf.write(bad_root / rows[5][2], np.zeros(100, np.float32), SR)  # 6 ms
    with pytest.raises(InputError) as err:
        evaluate_trials(trials, bad_root)
    text = str(err.value)
    assert "3 of" in text and "empty" in text and "unreadable" in text and "shorter than" in text
    assert all(str(bad_root / rows[i][j]) in text for i, j in ((0, 1), (0, 2), (5, 2)))
    kept = evaluate_trials(trials, bad_root, skip_bad=True)
    bad = {rows[0][1], rows[0][2], rows[5][2]}
    assert kept["trials"] == sum(1 for r in rows if r[1] not in bad and r[2] not in bad) < len(rows)
