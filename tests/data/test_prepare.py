"""Audio I/O and `prepare_shards`: skipped files, dense indices, FLAC fidelity, idempotence."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from raysv.audio.io import (
    AudioReadError,
    FFmpegNotFoundError,
    decode_audio,
    encode_flac,
    needs_ffmpeg,
    read_audio,
)
from raysv.artifacts.shards import ROW_GROUP_SIZE, decode_row, read_manifest, read_report, shard_files, shard_row_groups
from raysv.data import prepare as shards_mod
from raysv.data.pipelines import read_shards, stream_shards
from raysv.data.prepare import prepare_shards

SR = 16000
PCM16_TOL = 1.0 / 32768 + 1e-7
SHARD_SIZE = 4


def _tone(seconds: float, freq: float, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three speakers x two sessions x two utterances, plus files that must be skipped or converted."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    originals: dict[str, np.ndarray] = {}
    for s in (1, 2, 3):
        for sess in ("sessA", "sessB"):
            for u in (1, 2):
                rel = f"id{s:05d}/{sess}/{u:05d}.wav"
                wave = (_tone(0.8 + 0.1 * u, 110.0 * s + 7 * u) + 0.05 * rng.standard_normal(int((0.8 + 0.1 * u) * SR))).astype(np.float32)
                wave = np.clip(wave, -1, 1)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(root / rel, wave, SR, subtype="FLOAT")
                originals[rel] = wave
    (root / "id00001/sessA/corrupt.wav").write_bytes(rng.bytes(2048))
    (root / "id00002/sessA/empty.wav").write_bytes(b"")
    sf.write(root / "id00003/sessB/short.wav", _tone(0.2, 300.0), SR)
    left = _tone(1.5, 440.0, rate=44100, amp=0.6)
    stereo = np.stack([left, 0.5 * left], axis=1)
    sf.write(root / "id00002/sessB/stereo.wav", stereo, 44100, subtype="FLOAT")
    (root / "id00001/notes.txt").write_text("not audio")
    kept = sorted(list(originals) + ["id00002/sessB/stereo.wav"])
    return {
        "root": root,
        "originals": originals,
        "stereo": stereo,
        "kept": kept,
        "skipped": {
            "id00001/sessA/corrupt.wav": "unreadable",
            "id00002/sessA/empty.wav": "empty",
            "id00003/sessB/short.wav": "too_short",
        },
    }


@pytest.fixture(scope="module")
def prepared(corpus: dict, ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("prep") / "shards"
    report = prepare_shards(corpus["root"], out, shard_size=SHARD_SIZE, show_progress=False)
    return {"out": out, "report": report}


def _rows(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in shard_files(out)])


def _bytes_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".parquet"}


# ----------------------------------------------------------------------------- audio io


def test_read_audio_downmixes_and_resamples(corpus: dict) -> None:
    wave = read_audio(corpus["root"] / "id00002/sessB/stereo.wav", SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    n = corpus["stereo"].shape[0]
    assert wave.size == math.ceil(n * 160 / 441)
    expected = resample_poly(corpus["stereo"].mean(axis=1).astype(np.float64), 160, 441)
    np.testing.assert_allclose(wave, expected, atol=1e-5)
    assert abs(np.abs(wave[2000:-2000]).max() - 0.45) < 0.01


def test_read_audio_errors_name_the_file(corpus: dict, tmp_path: Path) -> None:
    bad = corpus["root"] / "id00001/sessA/corrupt.wav"
    with pytest.raises(AudioReadError, match="corrupt.wav"):
        read_audio(bad)
    with pytest.raises(AudioReadError, match="no such file"):
        read_audio(tmp_path / "missing.wav")
    assert needs_ffmpeg("a/b.M4A") and needs_ffmpeg("x.aac") and not needs_ffmpeg("x.flac")


FAKE_FFMPEG = """#!{python}
import sys
import numpy as np
args = sys.argv[1:]
src = args[args.index("-i") + 1]
if src.endswith("broken.m4a"):
    sys.stderr.write("moov atom not found\\n")
    sys.exit(1)
assert args[args.index("-ac") + 1] == "1" and args[args.index("-f") + 1] == "s16le"
rate = int(args[args.index("-ar") + 1])
pcm = (np.arange(rate // 2) % 200 - 100).astype("<i2")
sys.stdout.buffer.write(pcm.tobytes())
"""


def test_m4a_goes_through_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """m4a is decoded by the ffmpeg binary at the requested rate, mono s16le; its errors name the file."""
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ffmpeg"
    exe.write_text(FAKE_FFMPEG.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    clip = tmp_path / "clip.m4a"
    clip.write_bytes(b"\x00\x00\x00\x18ftypM4A ")
    wave = read_audio(clip, 8000)
    assert wave.dtype == np.float32 and wave.size == 4000
    np.testing.assert_array_equal(wave, (np.arange(4000) % 200 - 100).astype(np.float32) / 32768)
    broken = tmp_path / "broken.m4a"
    broken.write_bytes(b"junk")
    with pytest.raises(AudioReadError, match="broken.m4a.*moov atom not found"):
        read_audio(broken)


def test_flac_roundtrip_within_16_bit() -> None:
    rng = np.random.default_rng(1)
    wave = np.clip(rng.uniform(-1.0, 1.0, 24000), -1, 1).astype(np.float32)
    wave[:3] = [1.0, -1.0, 0.0]
    data = encode_flac(wave, 8000)
    assert data[:4] == b"fLaC" and data == encode_flac(wave, 8000)
    back, rate = decode_audio(data)
    assert rate == 8000 and back.dtype == np.float32 and back.shape == wave.shape
    assert np.abs(back - wave).max() <= PCM16_TOL
    assert back[1] == -1.0 and back[2] == 0.0


# ----------------------------------------------------------------------------- prepare


def test_report_lists_each_skipped_file(prepared: dict, corpus: dict) -> None:
    report = prepared["report"]
    assert {e["path"]: e["reason"] for e in report["skipped"]} == corpus["skipped"]
    assert report["num_inputs"] == len(corpus["kept"]) + 3
    assert report["num_utterances"] == len(corpus["kept"])
    assert report["num_skipped"] == 3
    assert report["skipped_by_reason"] == {"unreadable": 1, "empty": 1, "too_short": 1}
    assert report["num_speakers"] == 3
    assert read_report(prepared["out"]) == report
    assert not (prepared["out"] / "_tmp").exists()


def test_dense_index_in_sorted_path_order(prepared: dict, corpus: dict) -> None:
    out = prepared["out"]
    files = shard_files(out)
    kept = corpus["kept"]
    assert [Path(f).name for f in files] == [f"part-{i:05d}.parquet" for i in range(math.ceil(len(kept) / SHARD_SIZE))]
    rows = _rows(out)
    manifest = read_manifest(out)
    assert rows.column("utt_index").to_pylist() == list(range(len(kept)))
    assert rows.column("utt_id").to_pylist() == [k[: -len(".wav")] for k in kept]
    assert manifest.column_names == ["utt_index", "utt_id", "speaker", "sample_rate", "num_samples"]
    assert manifest.equals(rows.drop_columns(["audio"]))
    assert [pq.read_metadata(f).num_rows for f in files] == [SHARD_SIZE] * (len(files) - 1) + [len(kept) - SHARD_SIZE * (len(files) - 1)]


def test_schema_and_speakers(prepared: dict) -> None:
    rows = _rows(prepared["out"])
    schema = rows.schema
    assert schema.field("utt_index").type == pa.int64()
    assert schema.field("utt_id").type == pa.string()
    assert schema.field("speaker").type == pa.string()
    assert schema.field("audio").type == pa.binary()
    assert schema.field("sample_rate").type == pa.int32()
    assert schema.field("num_samples").type == pa.int64()
    for utt_id, spk in zip(rows.column("utt_id").to_pylist(), rows.column("speaker").to_pylist()):
        assert spk == utt_id.split("/")[0]
    assert set(rows.column("sample_rate").to_pylist()) == {SR}


def test_audio_round_trip(prepared: dict, corpus: dict) -> None:
    rows = _rows(prepared["out"]).to_pylist()
    by_id = {r["utt_id"]: r for r in rows}
    for rel, wave in corpus["originals"].items():
        row = by_id[rel[: -len(".wav")]]
        decoded = decode_row(row)
        assert row["num_samples"] == wave.size == decoded.size
        assert np.abs(decoded - wave).max() <= PCM16_TOL
    stereo = by_id["id00002/sessB/stereo"]
    decoded = decode_row(stereo)
    assert decoded.ndim == 1 and stereo["sample_rate"] == SR
    assert stereo["num_samples"] == decoded.size == math.ceil(corpus["stereo"].shape[0] * 160 / 441)
    expected = resample_poly(corpus["stereo"].mean(axis=1).astype(np.float64), 160, 441)
    assert np.abs(decoded - expected).max() <= PCM16_TOL + 1e-5


def test_read_shards_dataset(prepared: dict, corpus: dict) -> None:
    ds = read_shards(prepared["out"], columns=["utt_index", "utt_id", "audio"])
    rows = ds.take_all()
    assert len(rows) == len(corpus["kept"])
    assert sorted(r["utt_index"] for r in rows) == list(range(len(corpus["kept"])))
    assert set(rows[0]) == {"utt_index", "utt_id", "audio"}
    assert decode_row(rows[0]).dtype == np.float32


def test_stream_shards_mixes_row_groups_in_a_new_order_each_epoch(prepared: dict, corpus: dict) -> None:
    groups = shard_row_groups(prepared["out"])
    group_of = {}
    for g, (f, i) in enumerate(groups):
        for u in pq.ParquetFile(f).read_row_group(i, columns=["utt_index"]).column("utt_index").to_pylist():
            group_of[u] = g
    n = len(corpus["kept"])
    assert len(groups) >= 3 and sorted(group_of) == list(range(n))
    ds = stream_shards(prepared["out"], columns=["utt_index", "audio"], mix_row_groups=len(groups), block_rows=2)
    orders, mixed = set(), False
    for _ in range(6):  # one execution per epoch
        blocks = [b["utt_index"].tolist() for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
        assert max(len(b) for b in blocks) == 2
        rows = [i for b in blocks for i in b]
        assert sorted(rows) == list(range(n))  # every row once
        orders.add(tuple(rows))
        mixed |= any(len({group_of[u] for u in b}) > 1 for b in blocks)
    assert len(orders) > 1 and mixed  # both fail together with probability far below 1e-6
    with pytest.raises(ValueError, match="mix_row_groups"):
        stream_shards(prepared["out"], mix_row_groups=0)


def test_rerun_is_idempotent_and_byte_identical(prepared: dict, corpus: dict, tmp_path: Path) -> None:
    out = prepared["out"]
    before = _bytes_of(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = prepare_shards(corpus["root"], out, shard_size=SHARD_SIZE, show_progress=False)
    assert again["reused"] is True and again["fingerprint"] == prepared["report"]["fingerprint"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    other = tmp_path / "again"
    prepare_shards(corpus["root"], other, shard_size=SHARD_SIZE, show_progress=False)
    assert _bytes_of(other) == before


def test_unfinished_output_is_completed(prepared: dict, corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepared["out"], out)
    (out / "report.json").unlink()
    (out / "part-00001.parquet").write_bytes(b"truncated")
    report = prepare_shards(corpus["root"], out, shard_size=SHARD_SIZE, show_progress=False)
    assert "reused" not in report
    assert _bytes_of(out) == _bytes_of(prepared["out"])


def test_different_output_refused_unless_overwrite(prepared: dict, corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepared["out"], out)
    before = _bytes_of(out)
    with pytest.raises(FileExistsError, match=str(out)):
        prepare_shards(corpus["root"], out, shard_size=SHARD_SIZE, min_seconds=0.1, show_progress=False)
    assert _bytes_of(out) == before
    report = prepare_shards(corpus["root"], out, shard_size=SHARD_SIZE, min_seconds=0.1, overwrite=True, show_progress=False)
    assert report["num_utterances"] == len(corpus["kept"]) + 1
    assert "id00003/sessB/short" in read_manifest(out).column("utt_id").to_pylist()
    assert len(read_manifest(out)) == report["num_utterances"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_shards(corpus["root"], foreign, show_progress=False)
    assert (foreign / "thesis.tex").read_text() == "keep me"


def test_list_file_input(corpus: dict, ray_session, tmp_path: Path) -> None:
    root = corpus["root"]
    lst = tmp_path / "list.csv"
    lines = [
        "path,speaker",
        "id00003/sessA/00002.wav,alice",
        "id00001/sessB/00001.wav,",
        f"{root / 'id00002/sessA/00001.wav'},bob",
        "id00001/sessA/corrupt.wav,carol",
    ]
    lst.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    report = prepare_shards(root, out, list_file=lst, show_progress=False)
    assert report["num_inputs"] == 4 and report["num_utterances"] == 3
    assert [e["path"] for e in report["skipped"]] == ["id00001/sessA/corrupt.wav"]
    m = read_manifest(out)
    assert m.column("utt_id").to_pylist() == ["id00001/sessB/00001", "id00002/sessA/00001", "id00003/sessA/00002"]
    assert m.column("speaker").to_pylist() == ["id00001", "bob", "alice"]
    assert m.column("utt_index").to_pylist() == [0, 1, 2]

    no_spk = prepare_shards(root, tmp_path / "nospk", list_file=lst, no_speakers=True, show_progress=False)
    assert read_manifest(tmp_path / "nospk").column("speaker").null_count == 3
    assert no_spk["num_speakers"] == 0


def test_missing_ffmpeg_fails_before_any_work(corpus: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "m4a"
    shutil.copytree(corpus["root"] / "id00001", root / "id00001")
    (root / "id00001/sessA/clip.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A ")
    monkeypatch.setattr(shards_mod, "ffmpeg_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(FFmpegNotFoundError, match="apt-get install ffmpeg") as err:
        prepare_shards(root, out, show_progress=False)
    assert "clip.m4a" in str(err.value) and "conda" in str(err.value)
    assert not out.exists()


def test_shard_writer_row_groups_and_large_binary(tmp_path: Path) -> None:
    """Row groups stay small; large_binary is used when asked (shards that could pass 2 GiB)."""
    n = 150
    chunk = tmp_path / "chunk.parquet"
    pq.write_table(
        pa.Table.from_arrays(
            [
                pa.array([f"u{i:04d}" for i in range(n)]),
                pa.array([None] * n, pa.string()),
                pa.array([bytes([i % 256]) * 10 for i in range(n)], pa.large_binary()),
                pa.array([SR] * n, pa.int32()),
                pa.array([10] * n, pa.int64()),
            ],
            schema=shards_mod._CHUNK_SCHEMA,
        ),
        chunk,
    )
    for large, typ in ((False, pa.binary()), (True, pa.large_binary())):
        dest = tmp_path / f"part-{int(large):05d}.parquet"
        manifest = shards_mod._write_shard([(str(chunk), 5, 140)], 1000, str(dest), large)
        meta = pq.read_metadata(dest)
        assert meta.num_rows == 135 and meta.num_row_groups == math.ceil(135 / ROW_GROUP_SIZE)
        table = pq.read_table(dest)
        assert table.schema.field("audio").type == typ
        assert table.column("utt_index").to_pylist() == list(range(1000, 1135))
        assert table.column("utt_id").to_pylist()[0] == "u0005"
        assert "audio" not in manifest.column_names and manifest.num_rows == 135
        assert set(meta.metadata or {}) <= {b"ARROW:schema"}


def test_plan_shards_covers_every_kept_row() -> None:
    kept = [3, 0, 5, 2, 7]
    plans = shards_mod._plan_shards(kept, 4)
    sizes = [sum(b - a for _, a, b in p) for p in plans]
    assert sizes == [4, 4, 4, 4, 1]
    covered = [(c, i) for p in plans for c, a, b in p for i in range(a, b)]
    assert covered == [(c, i) for c, n in enumerate(kept) for i in range(n)]
