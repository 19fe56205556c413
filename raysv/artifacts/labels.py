"""Pseudo-labels on disk: ``labels.parquet`` with ``utt_index`` (int64) and ``label`` (int32, -1 = dropped).

Training joins these to the shards by ``utt_index``, so the audio is never rewritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LABELS_FILE = "labels.parquet"


def write_labels(out_dir: str | Path, utt_index: np.ndarray, labels: np.ndarray) -> Path:
    """Write ``out_dir/labels.parquet`` and return its path; labels must be >= -1."""
    out_dir = Path(out_dir)
    idx = np.asarray(utt_index)
    lab = np.asarray(labels)
    if idx.ndim != 1 or lab.ndim != 1:
        raise ValueError(f"utt_index and labels must be 1-D, got shapes {idx.shape} and {lab.shape}")
    if len(idx) != len(lab):
        raise ValueError(f"utt_index has {len(idx)} rows but labels has {len(lab)}")
    if not np.issubdtype(idx.dtype, np.integer) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"utt_index and labels must be integers, got {idx.dtype} and {lab.dtype}")
    if len(lab) and lab.min() < -1:
        raise ValueError(f"labels must be >= -1 (-1 = dropped), got minimum {int(lab.min())}")
    if len(lab) and lab.max() > np.iinfo(np.int32).max:
        raise ValueError(f"labels exceed int32: maximum {int(lab.max())}")
    if len(np.unique(idx)) != len(idx):
        raise ValueError("utt_index has duplicate values; each utterance gets one label")
    table = pa.table(
        {
            "utt_index": pa.array(idx.astype(np.int64, copy=False), type=pa.int64()),
            "label": pa.array(lab.astype(np.int32, copy=False), type=pa.int32()),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LABELS_FILE
    pq.write_table(table, path)
    return path


def read_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``labels.parquet`` (or the folder holding it) as ``(utt_index int64 ascending, label int32)``."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    try:
        table = pq.read_table(path, columns=["utt_index", "label"])
    except (pa.ArrowInvalid, KeyError) as err:
        raise ValueError(f"cannot read labels file {path}: {err}") from err
    for name in ("utt_index", "label"):
        if table.column(name).null_count:
            raise ValueError(f"{path}: column '{name}' has nulls")
    idx = table.column("utt_index").to_numpy().astype(np.int64, copy=False)
    lab = table.column("label").to_numpy().astype(np.int32, copy=False)
    if len(idx) > 1 and np.any(idx[1:] < idx[:-1]):
        order = np.argsort(idx, kind="stable")
        idx, lab = idx[order], lab[order]
    return idx, lab


def num_classes(labels: np.ndarray) -> int:
    """Classifier width for these labels: ``max + 1`` over kept labels (0 when every label is -1)."""
    lab = np.asarray(labels)
    kept = lab[lab >= 0]
    return int(kept.max()) + 1 if kept.size else 0


def speaker_labels(manifest: pa.Table) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """True-speaker labels from a shard manifest: ``(utt_index, label, speaker names)``.

    For the supervised reference a pseudo-label round is compared with (fine-tuning on
    the real speakers); utterances without a speaker are an error, not a silent drop.
    """
    if "speaker" not in manifest.column_names:
        raise ValueError("the manifest has no 'speaker' column: prepare the shards with speakers to use true labels")
    speakers = manifest.column("speaker").to_pylist()
    idx = manifest.column("utt_index").to_numpy().astype(np.int64)
    missing = [int(i) for i, s in zip(idx, speakers) if not s]
    if missing:
        raise ValueError(f"{len(missing)} utterances have no speaker (utt_index {missing[:5]}...)")
    names = sorted(set(speakers))
    index = {name: i for i, name in enumerate(names)}
    return idx, np.asarray([index[s] for s in speakers], dtype=np.int32), names
