"""Labels on disk and the true speakers of a manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysv.artifacts.labels import num_classes, read_labels, write_labels


def test_labels_round_trip(tmp_path: Path) -> None:
    idx = np.array([5, 1, 3, 0], dtype=np.int64)
    lab = np.array([2, -1, 0, 2], dtype=np.int32)
    path = write_labels(tmp_path / "lab", idx, lab)
    assert path == tmp_path / "lab" / "labels.parquet"
    schema = pq.read_schema(path)
    assert schema.field("utt_index").type == pa.int64() and schema.field("label").type == pa.int32()
    for where in (path, tmp_path / "lab"):
        got_idx, got_lab = read_labels(where)
        np.testing.assert_array_equal(got_idx, [0, 1, 3, 5])
        np.testing.assert_array_equal(got_lab, [2, -1, 0, 2])
    assert num_classes(lab) == 3 and num_classes(np.array([-1, -1])) == 0
    with pytest.raises(ValueError, match=">= -1"):
        write_labels(tmp_path, idx, np.array([0, -2, 1, 1]))
    with pytest.raises(FileNotFoundError, match="none does not exist"):
        read_labels(tmp_path / "none")
    (tmp_path / "nolabels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nolabels/labels\.parquet does not exist"):
        read_labels(tmp_path / "nolabels")


def test_true_speaker_labels_from_manifest(tmp_path: Path) -> None:
    from raysv.artifacts.labels import speaker_labels

    manifest = pa.table({"utt_index": [0, 1, 2, 3], "speaker": ["b", "a", "b", "c"]})
    utt, labels, names = speaker_labels(manifest)
    assert names == ["a", "b", "c"] and utt.tolist() == [0, 1, 2, 3] and labels.tolist() == [1, 0, 1, 2]
    with pytest.raises(ValueError, match="no speaker"):
        speaker_labels(pa.table({"utt_index": [0, 1], "speaker": ["a", None]}))
    with pytest.raises(ValueError, match="'speaker' column"):
        speaker_labels(pa.table({"utt_index": [0]}))
