"""Using a model: the WeSpeaker-shaped API, enrolment and identification, wav.scp lists, embed formats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import save_tiny_ecapa
from raysv.data.wavscp import read_wav_scp
from raysv.inference import load_model
from raysv.speakers import UNKNOWN, SpeakerDB


def _tone(f0: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    harmonics = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return (0.2 * harmonics + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def model_and_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    folder = save_tiny_ecapa(root / "model", threshold=0.9)
    files = {}
    for name, f0 in (("low", 110.0), ("mid", 180.0), ("high", 290.0)):
        for i in range(3):
            path = root / "wav" / name / f"{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, _tone(f0 * (1 + 0.01 * i), 1.5, i), 16000, subtype="PCM_16")
            files.setdefault(name, []).append(path)
    return folder, files, root


def test_wespeaker_api(model_and_files):
    folder, files, _ = model_and_files
    model = load_model(folder, device="cpu")
    a, b = files["low"][0], files["high"][0]
    ea, eb = model.extract_embedding(a), model.extract_embedding(b)
    np.testing.assert_allclose(ea, model.embed(a))
    cos = float(ea @ eb)
    assert model.compute_similarity(a, b) == pytest.approx((cos + 1) / 2, abs=1e-6)  # WeSpeaker's mapping
    assert model.compute_similarity(ea, eb) == pytest.approx((cos + 1) / 2, abs=1e-6)
    names, embeddings = model.extract_embedding_list([a, b])
    assert names == [str(a), str(b)] and embeddings.shape == (2, 16)
    assert model.register("low", files["low"][:2]) == 2
    model.register("high", files["high"][0])
    result = model.recognize(files["low"][2])
    assert set(result) == {"name", "confidence"} and -1.0 <= result["confidence"] <= 1.0
    assert result["name"] in ("low", UNKNOWN)
    # The score of two whole-file embeddings of a model evaluated without crops is their cosine.
    assert model.score(a, b) == pytest.approx(cos, abs=1e-5)


def test_enroll_identify_and_unknown(model_and_files, tmp_path):
    folder, files, _ = model_and_files
    model = load_model(folder, device="cpu")
    db = tmp_path / "speakers.parquet"
    for name in ("low", "mid", "high"):
        assert model.enroll(db, name, files[name][:1]) == 1
    assert model.enroll(db, "low", files["low"][1:2]) == 2  # enrolling again adds files
    table = pq.read_table(db)
    assert table.column_names == ["name", "sum", "count"] and table.num_rows == 3
    stored = SpeakerDB(db)
    expected = np.stack([model.embed(f) for f in files["low"][:2]]).sum(axis=0)
    np.testing.assert_allclose(stored.sums[stored.names.index("low")], expected, rtol=1e-5)
    matches = model.identify(db, files["low"][2], top=3, threshold=-1.0)
    assert [m.speaker for m in matches][0] == max(matches, key=lambda m: m.score).speaker
    assert len(matches) == 3 and all(m.name != UNKNOWN for m in matches)
    (best,) = model.identify(db, files["low"][2], threshold=1.01)
    assert best.name == UNKNOWN and best.speaker in ("low", "mid", "high")  # below the threshold: unknown


def test_wav_scp(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    scp = tmp_path / "wav.scp"
    scp.write_text("utt1 a.wav\n# a comment\n\nutt2 /data/b.flac\n")
    assert read_wav_scp(scp) == {"utt1": tmp_path / "a.wav", "utt2": Path("/data/b.flac")}
    scp.write_text("utt1 a.wav\nutt2 sox b.wav -t wav - |\n")
    with pytest.raises(ValueError, match=r"wav.scp:2: utt2 is a piped command"):
        read_wav_scp(scp)
    scp.write_text("utt1\n")
    with pytest.raises(ValueError, match=r"wav.scp:1: expected 'utt_id path'"):
        read_wav_scp(scp)


def test_cli_embed_enroll_identify(model_and_files, tmp_path):
    folder, files, root = model_and_files
    scp = tmp_path / "wav.scp"
    scp.write_text("".join(f"{name}{i} {p}\n" for name, paths in files.items() for i, p in enumerate(paths)))

    def raysv(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raysv.cli", *args], capture_output=True, text=True)

    out = raysv("embed", "--checkpoint", str(folder), str(scp), "--format", "parquet", "--out", str(tmp_path / "e.parquet"))
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("name").to_pylist()[0] == "low0" and table.num_rows == 9
    out = raysv("embed", "--checkpoint", str(folder), str(files["mid"][0]), "--format", "npy", "--out", str(tmp_path / "e.npy"))
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "e.npy")[0], load_model(folder, device="cpu").embed(files["mid"][0]),
                               atol=1e-6)
    db = tmp_path / "db.parquet"
    assert raysv("enroll", "--checkpoint", str(folder), "--db", str(db), "high", *map(str, files["high"][:2])).returncode == 0
    assert raysv("enroll", "--checkpoint", str(folder), "--db", str(db), "low", str(files["low"][0])).returncode == 0
    out = raysv("identify", "--checkpoint", str(folder), "--db", str(db), "--threshold", "-1", str(files["high"][2]))
    assert out.returncode == 0, out.stderr
    assert str(files["high"][2]) in out.stdout and ("high" in out.stdout or "low" in out.stdout)
    missing = raysv("identify", "--checkpoint", str(folder), "--db", str(tmp_path / "none.parquet"), str(files["high"][2]))
    assert missing.returncode == 2 and "none.parquet" in missing.stderr and "Traceback" not in missing.stderr
