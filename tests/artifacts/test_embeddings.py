"""Embeddings on disk: round trips through a file and a directory, errors that name the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysv.artifacts.embeddings import read_embeddings, write_embeddings


def test_embeddings_round_trip_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    idx = rng.permutation(50).astype(np.int64) + 100
    emb = rng.normal(size=(50, 7)).astype(np.float32)
    write_embeddings(tmp_path / "e.parquet", idx, emb)
    schema = pq.read_schema(tmp_path / "e.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32(), 7)
    assert schema.field("utt_index").type == pa.int64()
    got_idx, got = read_embeddings(tmp_path / "e.parquet")
    order = np.argsort(idx)
    np.testing.assert_array_equal(got_idx, idx[order])
    np.testing.assert_array_equal(got, emb[order])
    assert got.dtype == np.float32 and got_idx.dtype == np.int64


def test_embeddings_round_trip_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    idx = rng.permutation(90).astype(np.int64)
    emb = rng.normal(size=(90, 5)).astype(np.float32)
    d = tmp_path / "emb"
    for part, sl in enumerate([slice(0, 30), slice(30, 31), slice(31, 90)]):
        write_embeddings(d / f"part-{part:05d}.parquet", idx[sl], emb[sl])
    # a Ray Data-style tensor column: equal-length large_list<float> storage
    ray_style = pa.table(
        {
            "utt_index": pa.array([1000, 1001], pa.int64()),
            "embedding": pa.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], pa.large_list(pa.float32())),
        }
    )
    pq.write_table(ray_style, d / "ray-000.parquet", row_group_size=1)
    (d / "_SUCCESS").write_text("")
    (d / ".part.parquet.crc").write_text("x")
    (d / "notes.json").write_text("{}")
    got_idx, got = read_embeddings(d)
    all_idx = np.concatenate([idx, [1000, 1001]])
    all_emb = np.concatenate([emb, np.arange(1, 11, dtype=np.float32).reshape(2, 5)])
    order = np.argsort(all_idx)
    np.testing.assert_array_equal(got_idx, all_idx[order])
    np.testing.assert_array_equal(got, all_emb[order])


def test_embeddings_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_embeddings(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*no \.parquet files"):
        read_embeddings(tmp_path / "empty")
    d = tmp_path / "dup"
    write_embeddings(d / "a.parquet", np.array([0, 1, 2]), np.ones((3, 4)))
    write_embeddings(d / "b.parquet", np.array([2, 3]), np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"dup.*repeat 1 utt_index values, e\.g\. \[2\]"):
        read_embeddings(d)
    with pytest.raises(ValueError, match="3 rows but embeddings has 2"):
        write_embeddings(tmp_path / "x.parquet", np.arange(3), np.ones((2, 4)))
    pq.write_table(
        pa.table({"utt_index": pa.array([0, 1]), "embedding": pa.array([[1.0], [1.0, 2.0]])}),
        tmp_path / "ragged.parquet",
    )
    with pytest.raises(ValueError, match=r"ragged\.parquet.*different lengths"):
        read_embeddings(tmp_path / "ragged.parquet")
