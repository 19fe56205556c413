"""Embedding extraction by a Ray actor pool matches unbatched, one-utterance-at-a-time embeddings."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from raysv.artifacts.checkpoint import save_model
from raysv.artifacts.embeddings import read_embeddings
from raysv.embedding.core import embed_equal_length, utterance_embedding
from raysv.embedding.pool import check_coverage, extract_embeddings
from raysv.models import load_encoder
from raysv.models.ecapa import ECAPAEncoder

SR = 16000
MAX_SECONDS = 1.5
# Seconds per utterance: repeated lengths so equal-length batching happens, plus two longer
# than MAX_SECONDS (4.2 s: remainder 1.2 s kept as a chunk; 3.4 s: remainder 0.4 s → last window).
DURATIONS = [1.0, 1.0, 1.25, 1.0, 1.25, 0.75, 1.5, 1.0, 4.2, 1.25, 0.75, 3.4, 1.0, 1.5]
ROWS_PER_PART = 4


def _flac(wave: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A shard folder written directly in the shard format, several part files of a few rows."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(7)
    rows = []
    for i, seconds in enumerate(DURATIONS):
        n = int(round(seconds * SR))
        t = np.arange(n) / SR
        wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(n)
        rows.append((i, f"spk{i % 3}/utt{i}", f"spk{i % 3}", _flac(wave.astype(np.float32)), n))
    for part, start in enumerate(range(0, len(rows), ROWS_PER_PART)):
        chunk = rows[start : start + ROWS_PER_PART]
        table = pa.table(
            {
                "utt_index": pa.array([r[0] for r in chunk], pa.int64()),
                "utt_id": [r[1] for r in chunk],
                "speaker": [r[2] for r in chunk],
                "audio": pa.array([r[3] for r in chunk], pa.binary()),
                "sample_rate": pa.array([SR] * len(chunk), pa.int32()),
                "num_samples": pa.array([r[4] for r in chunk], pa.int64()),
            }
        )
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    (folder / "report.json").write_text(json.dumps({"kept": len(rows)}))
    waves = {r[0]: sf.read(io.BytesIO(r[3]), dtype="float32")[0] for r in rows}
    return folder, waves


@pytest.fixture(scope="module")
def ecapa_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    encoder = ECAPAEncoder(channels=32, mfa_channels=96, embed_dim=16)
    return save_model(tmp_path_factory.mktemp("ecapa"), encoder)


@pytest.fixture(scope="module")
def wavlm_checkpoint(tmp_path_factory):
    from raysv.models.wavlm_mhfa import load_wavlm_mhfa, save_tiny_wavlm

    pretrained = save_tiny_wavlm(tmp_path_factory.mktemp("tiny_wavlm"), seed=0)
    torch.manual_seed(1)
    encoder = load_wavlm_mhfa(str(pretrained), heads=4, compression=8, embed_dim=16)
    return save_model(tmp_path_factory.mktemp("wavlm"), encoder)


def _reference(checkpoint, waves: dict[int, np.ndarray]) -> np.ndarray:
    """Each utterance alone: whole if short, else the mean of its unit-length chunk embeddings."""
    encoder, _ = load_encoder(checkpoint)
    max_n = int(MAX_SECONDS * SR)
    out = []
    for idx in sorted(waves):
        w = waves[idx]
        if w.size <= max_n:
            chunks = [w]
        else:
            full = w.size // max_n
            chunks = [w[k * max_n : (k + 1) * max_n] for k in range(full)]
            rest = w.size - full * max_n
            chunks.append(w[full * max_n :] if rest >= SR else w[-max_n:])
        embs = []
        for c in chunks:
            with torch.no_grad():
                e = encoder(torch.from_numpy(np.ascontiguousarray(c))[None])[0].numpy().astype(np.float64)
            embs.append(e / np.linalg.norm(e))
        m = np.mean(embs, axis=0)
        out.append(m / np.linalg.norm(m))
    return np.stack(out)


def _run(ray_session, checkpoint, shards, out):
    folder, waves = shards
    info = extract_embeddings(
        checkpoint, folder, out, max_seconds=MAX_SECONDS, batch_size=4, num_actors=2, use_gpu=False
    )
    return info, waves


@pytest.fixture(scope="module")
def ecapa_run(ray_session, ecapa_checkpoint, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb_ecapa")
    info, waves = _run(ray_session, ecapa_checkpoint, shards, out)
    return info, waves, out


@pytest.fixture(scope="module")
def wavlm_run(ray_session, wavlm_checkpoint, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb_wavlm")
    info, waves = _run(ray_session, wavlm_checkpoint, shards, out)
    return info, waves, out


@pytest.mark.parametrize("run_name,ckpt_name", [("ecapa_run", "ecapa_checkpoint"), ("wavlm_run", "wavlm_checkpoint")])
def test_actor_pool_matches_unbatched_reference(request, run_name, ckpt_name):
    info, waves, out = request.getfixturevalue(run_name)
    checkpoint = request.getfixturevalue(ckpt_name)
    utt_index, emb = read_embeddings(out / "embeddings.parquet")
    np.testing.assert_array_equal(utt_index, np.arange(len(DURATIONS)))
    assert emb.shape == (len(DURATIONS), 16)
    np.testing.assert_allclose(emb, _reference(checkpoint, waves), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Two actor processes did the work, and the pid column was not written to the final file.
    assert len(info["actor_pids"]) == 2
    assert pq.read_schema(out / "embeddings.parquet").names == ["utt_index", "embedding"]
    marker = json.loads((out / "extract.json").read_text())
    assert marker["count"] == len(DURATIONS) and marker["dim"] == 16
    assert sorted(marker["actor_pids"]) == sorted(info["actor_pids"])


def test_long_utterance_is_mean_of_chunks(ecapa_checkpoint):
    encoder, _ = load_encoder(ecapa_checkpoint)
    rng = np.random.default_rng(3)
    wave = (0.1 * rng.standard_normal(int(3.3 * SR))).astype(np.float32)

    def unit(x):
        with torch.no_grad():
            e = encoder(torch.from_numpy(np.ascontiguousarray(x))[None])[0].numpy().astype(np.float64)
        return e / np.linalg.norm(e)

    # 1 s chunks of 3.3 s: three full ones, and the 0.3 s remainder replaced by the last 1 s window.
    chunks = [wave[:SR], wave[SR : 2 * SR], wave[2 * SR : 3 * SR], wave[-SR:]]
    expected = np.mean([unit(c) for c in chunks], axis=0)
    got = utterance_embedding(encoder, wave, 1.0, "cpu")
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), atol=1e-5)
    # 2 s chunks: one full chunk and the 1.3 s remainder as a chunk of its own.
    expected = np.mean([unit(wave[: 2 * SR]), unit(wave[2 * SR :])], axis=0)
    got = utterance_embedding(encoder, wave, 2.0, "cpu")
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), atol=1e-5)
    # Short enough: the whole utterance in one pass.
    np.testing.assert_allclose(utterance_embedding(encoder, wave, 5.0, "cpu"), unit(wave), atol=1e-5)


def test_embedding_does_not_depend_on_batch_companions(wavlm_checkpoint):
    encoder, _ = load_encoder(wavlm_checkpoint)
    rng = np.random.default_rng(5)
    target = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    alone = embed_equal_length(encoder, [target], 10.0, "cpu")[0]
    companions = [(0.5 * rng.standard_normal(n)).astype(np.float32) for n in (SR, 2 * SR, SR // 2, SR)]
    together = embed_equal_length(encoder, [companions[0], target, *companions[1:]], 10.0, "cpu")
    np.testing.assert_allclose(together[1], alone, atol=1e-5)


def test_bad_inputs_are_named(tmp_path, ecapa_checkpoint):
    with pytest.raises(FileNotFoundError, match="not a raysv checkpoint"):
        extract_embeddings(tmp_path / "nope", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="empty_shards"):
        (tmp_path / "empty_shards").mkdir()
        extract_embeddings(ecapa_checkpoint, tmp_path / "empty_shards", tmp_path / "out")
    encoder, _ = load_encoder(ecapa_checkpoint)
    with pytest.raises(ValueError, match="max_seconds"):
        utterance_embedding(encoder, np.zeros(SR, np.float32), 0.0, "cpu")
    with pytest.raises(ValueError, match="waveform 1 is empty"):
        embed_equal_length(encoder, [np.zeros(SR, np.float32), np.zeros(0, np.float32)], 1.0, "cpu")


def test_coverage_check_names_missing_and_repeated_rows():
    check_coverage(np.array([2, 0, 1]), np.array([0, 1, 2]), "s")
    with pytest.raises(RuntimeError, match="utt_index 1 more than once"):
        check_coverage(np.arange(3), np.array([0, 1, 1, 2]), "s")
    with pytest.raises(RuntimeError, match=r"missing utt_index \[3\], unexpected \[7\]"):
        check_coverage(np.arange(4), np.array([0, 1, 2, 7]), "s")


def test_fbank_mean_baseline_extraction(ray_session, shards, tmp_path):
    from raysv.embedding.baseline import fbank_mean_embedding

    folder, waves = shards
    info = extract_embeddings("fbank-mean", folder, tmp_path, max_seconds=MAX_SECONDS, batch_size=4,
                              num_actors=2, use_gpu=False)
    utt_index, emb = read_embeddings(tmp_path / "embeddings.parquet")
    np.testing.assert_array_equal(utt_index, np.arange(len(DURATIONS)))
    limit = int(MAX_SECONDS * 16000)
    expected = np.stack([fbank_mean_embedding(waves[i][:limit]) for i in range(len(DURATIONS))])
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    assert info["dim"] == 160 and len(info["actor_pids"]) == 2
    # an AS-norm cohort: only the chosen rows, equal to the same rows of the whole extraction
    chosen = np.array([len(DURATIONS) - 1, 0, 2])
    extract_embeddings("fbank-mean", folder, tmp_path / "cohort", max_seconds=MAX_SECONDS, batch_size=4,
                       num_actors=1, use_gpu=False, utt_indices=chosen)
    sub_index, sub = read_embeddings(tmp_path / "cohort" / "embeddings.parquet")
    np.testing.assert_array_equal(sub_index, np.sort(chosen))
    np.testing.assert_allclose(sub, expected[np.sort(chosen)], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"utt_index \[999\] not in the shards"):
        extract_embeddings("fbank-mean", folder, tmp_path / "bad", utt_indices=np.array([0, 999]))
