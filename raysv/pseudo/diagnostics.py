"""How a clustering looks: cluster sizes and, when the shards know the speakers, NMI, ARI and purity.

Speakers only score labels, they never make them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from raysv.artifacts.shards import manifest_columns, read_manifest

log = logging.getLogger(__name__)


def _size_histogram(sizes: np.ndarray) -> dict[str, int]:
    """Cluster counts per power-of-two size bin ("1", "2-3", "4-7", ...)."""
    hist: dict[str, int] = {}
    if sizes.size == 0:
        return hist
    top = int(sizes.max())
    lo = 1
    while lo <= top:
        hi = 2 * lo - 1
        count = int(((sizes >= lo) & (sizes <= hi)).sum())
        hist[str(lo) if lo == hi else f"{lo}-{hi}"] = count
        lo *= 2
    return hist


def _known_mask(speakers: np.ndarray) -> np.ndarray:
    """True where a speaker is given (not None, NaN or empty)."""
    return np.fromiter(
        (s is not None and s == s and s != "" for s in speakers), dtype=bool, count=len(speakers)
    )


def cluster_diagnostics(labels: np.ndarray, speakers: list[str] | np.ndarray | None = None) -> dict[str, Any]:
    """How the clustering looks: sizes, dropped count, and (speakers known) NMI/ARI/purity.

    NMI, ARI and purity are computed over kept utterances (label >= 0) whose
    speaker is known; speakers only score labels, they never make them.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {lab.shape} and dtype {lab.dtype}")
    kept = lab >= 0
    counts = np.bincount(lab[kept]) if kept.any() else np.zeros(0, dtype=np.int64)
    sizes = counts[counts > 0]
    out: dict[str, Any] = {
        "num_utterances": int(len(lab)),
        "num_clusters": int(len(sizes)),
        "dropped": int((~kept).sum()),
        "size_min": int(sizes.min()) if sizes.size else 0,
        "size_median": float(np.median(sizes)) if sizes.size else 0.0,
        "size_mean": float(sizes.mean()) if sizes.size else 0.0,
        "size_max": int(sizes.max()) if sizes.size else 0,
        "size_histogram": _size_histogram(sizes),
        "sizes": counts.astype(int).tolist(),
    }
    if speakers is None:
        return out
    spk = np.asarray(speakers, dtype=object)
    if spk.shape != lab.shape:
        raise ValueError(f"speakers has {spk.shape[0] if spk.ndim else 0} entries but labels has {len(lab)}")
    known = _known_mask(spk)
    scored = kept & known
    out["speakers_known"] = int(known.sum())
    if not scored.any():
        return out
    _, spk_codes = np.unique(spk[scored].astype(str), return_inverse=True)
    spk_codes = spk_codes.reshape(-1)
    lab_s = lab[scored]
    table = contingency_matrix(spk_codes, lab_s, sparse=True)
    out.update(
        {
            "scored": int(scored.sum()),
            "num_speakers": int(spk_codes.max()) + 1,
            "nmi": float(normalized_mutual_info_score(spk_codes, lab_s)),
            "ari": float(adjusted_rand_score(spk_codes, lab_s)),
            "purity": float(table.max(axis=0).sum() / scored.sum()),
        }
    )
    return out


def label_agreement(
    utt_index: np.ndarray, labels: np.ndarray, previous_index: np.ndarray, previous: np.ndarray
) -> dict[str, Any]:
    """How far a round's labels agree with the previous round's, over utterances labelled in both.

    NMI and ARI between the two labellings (cluster ids need not match). Needs no speakers: on
    unlabelled data it is how a user sees the rounds settle (towards 1 as re-clustering stops
    changing the labels) or a round merely reproduce the labels its model was trained on.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    idx, lab = np.asarray(utt_index, dtype=np.int64), np.asarray(labels)
    p_idx, p_lab = np.asarray(previous_index, dtype=np.int64), np.asarray(previous)
    if idx.shape != lab.shape or p_idx.shape != p_lab.shape:
        raise ValueError("utt_index and labels must have the same length (both labellings)")
    _, here, there = np.intersect1d(idx, p_idx, return_indices=True)
    a, b = lab[here], p_lab[there]
    both = (a >= 0) & (b >= 0)
    if not both.any():
        return {"previous_utterances": 0}
    return {
        "previous_utterances": int(both.sum()),
        "previous_nmi": float(normalized_mutual_info_score(b[both], a[both])),
        "previous_ari": float(adjusted_rand_score(b[both], a[both])),
    }


def manifest_speakers_of(manifest: str | Path, utt_index: np.ndarray) -> np.ndarray | None:
    """Speakers (object array, None = unknown) aligned to ``utt_index`` from ``manifest.parquet`` (file or its folder)."""
    path = Path(manifest)
    if not (path / "manifest.parquet" if path.is_dir() else path).is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    names = manifest_columns(path)
    if "utt_index" not in names:
        raise ValueError(f"manifest {path} has no 'utt_index' column")
    if "speaker" not in names:
        log.info("manifest %s has no 'speaker' column; skipping NMI/ARI/purity", path)
        return None
    table = read_manifest(path, ["utt_index", "speaker"])
    m_idx = table.column("utt_index").to_numpy().astype(np.int64, copy=False)
    m_spk = np.asarray(table.column("speaker").to_numpy(zero_copy_only=False), dtype=object)
    order = np.argsort(m_idx, kind="stable")
    m_idx, m_spk = m_idx[order], m_spk[order]
    pos = np.searchsorted(m_idx, utt_index)
    pos_c = np.minimum(pos, len(m_idx) - 1)
    found = (pos < len(m_idx)) & (m_idx[pos_c] == utt_index) if len(m_idx) else np.zeros(len(utt_index), bool)
    if not found.all():
        missing = utt_index[~found]
        raise ValueError(
            f"manifest {path} lacks {len(missing)} utt_index values present in the embeddings, "
            f"e.g. {missing[:5].tolist()}"
        )
    return m_spk[pos_c]
