"""The clustering stage's work in a Ray actor: labels and clusters.json, and nothing left on error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import normalized_mutual_info_score
from test_cluster import speakers_data  # tests/pseudo/test_cluster.py

from raysv.artifacts.embeddings import write_embeddings
from raysv.artifacts.labels import read_labels, write_labels
from raysv.errors import InputError
from raysv.pseudo.lda import LdaConfig
from raysv.pseudo.remote import run_clustering


def test_run_clustering_in_ray_actor(tmp_path: Path, ray_session) -> None:
    x, y = speakers_data(n_speakers=30, per_speaker=20, seed=2)
    n = len(y)
    utt_index = np.arange(n, dtype=np.int64)
    emb_dir = tmp_path / "embeddings"
    for part in range(3):
        rows = utt_index[part::3]
        write_embeddings(emb_dir / f"part-{part}.parquet", rows, x[rows])
    speakers: list[str | None] = [f"id{s:03d}" for s in y]
    speakers[0] = None  # an utterance without a known speaker is not scored
    _write_manifest(tmp_path / "manifest.parquet", utt_index, speakers)
    out = tmp_path / "cluster"
    out.mkdir()
    (out / "clusters.json").write_text("stale")

    info = run_clustering(emb_dir, out, k1=90, k2=30, seed=0, manifest=tmp_path / "manifest.parquet")

    got_idx, labels = read_labels(out)
    np.testing.assert_array_equal(got_idx, utt_index)
    assert normalized_mutual_info_score(y, labels) >= 0.95
    saved = json.loads((out / "clusters.json").read_text())
    assert saved == info
    assert saved["k1"] == 90 and saved["k2"] == 30 and saved["min_cluster_size"] == 0
    assert saved["num_clusters"] == 30 and sum(saved["sizes"]) == n
    assert saved["scored"] == n - 1
    expected = normalized_mutual_info_score(y[1:], labels[1:])
    assert saved["nmi"] == pytest.approx(expected) and saved["nmi"] >= 0.95
    assert 0.9 <= saved["purity"] <= 1.0 and "ari" in saved

    # no manifest: no speaker figures; the agreement with a previous labelling needs no speakers
    previous = write_labels(tmp_path / "previous", utt_index[::2], (y[::2] + 7) % 30)  # every other row, renamed
    info2 = run_clustering(emb_dir, tmp_path / "c2", k1=30, previous=previous)
    assert "nmi" not in info2 and info2["k2"] is None and info2["num_clusters"] <= 30
    _, labels2 = read_labels(tmp_path / "c2")
    assert info2["previous_utterances"] == len(utt_index[::2])
    assert info2["previous_nmi"] == pytest.approx(normalized_mutual_info_score(y[::2], labels2[::2]))

    # k2: auto records the estimate beside the true count, and the silhouette curve it came from
    auto = run_clustering(emb_dir, tmp_path / "c3", k1=90, k2="auto", k2_factor=1.5, k2_fallback=40,
                          manifest=tmp_path / "manifest.parquet")
    saved = json.loads((tmp_path / "c3" / "clusters.json").read_text())
    assert saved == auto and auto["k2"] == "auto" and auto["num_speakers"] == 30
    assert abs(auto["k2_estimate"] - 30) <= 9 and auto["k2_used"] == round(1.5 * auto["k2_estimate"])
    best = max(auto["silhouette"], key=lambda point: point[1])
    assert best[0] == auto["k2_estimate"]

    # k1: null — Ward of the utterances themselves, and clusters.json says so
    direct = run_clustering(emb_dir, tmp_path / "c4", k1=None, k2=30, manifest=tmp_path / "manifest.parquet")
    assert direct["k1"] is None and direct["kmeans"] == "none" and direct["k2_used"] == 30
    assert direct["nmi"] >= 0.95 and direct["lda"] is None

    # passes of LDA: their settings and how the labels settled go into clusters.json
    refined = run_clustering(emb_dir, tmp_path / "c5", k1=None, k2=30, manifest=tmp_path / "manifest.parquet",
                             lda=LdaConfig(iterations=2, dim=16))
    saved = json.loads((tmp_path / "c5" / "clusters.json").read_text())
    assert saved == refined and saved["lda"] == {"iterations": 2, "dim": 16, "shrinkage": 0.1}
    assert saved["lda_dim"] == 16 and len(saved["lda_previous_nmi"]) == 2 and saved["nmi"] >= 0.95


def test_run_clustering_errors_leave_no_marker(tmp_path: Path, ray_session) -> None:
    x, _ = speakers_data(n_speakers=3, per_speaker=5, dim=8)
    x[4] = np.nan
    write_embeddings(tmp_path / "e.parquet", np.arange(15), x)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="1 rows with NaN"):  # raised inside the actor
        run_clustering(tmp_path / "e.parquet", out, k1=3)
    assert not (out / "clusters.json").exists()
    with pytest.raises(ValueError, match="k1=16 is larger"):
        run_clustering(tmp_path / "e.parquet", out, k1=16)
    with pytest.raises(InputError, match="k1=None and k2=None"):  # before any Ray work
        run_clustering(tmp_path / "e.parquet", out, k1=None)
    with pytest.raises(ValueError, match=r"cluster\.lda\.iterations: a whole number >= 0"):
        run_clustering(tmp_path / "e.parquet", out, k1=3, lda=LdaConfig(iterations=-1))
    noise = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    write_embeddings(tmp_path / "noise.parquet", np.arange(300), noise)
    with pytest.raises(InputError, match="no count of speakers") as err:  # the cause alone: one line in the CLI
        run_clustering(tmp_path / "noise.parquet", out, k1=60, k2="auto", metric="cosine")
    assert type(err.value) is InputError and not (out / "clusters.json").exists()
    _write_manifest(tmp_path / "m.parquet", np.arange(10), ["a"] * 10)
    with pytest.raises(ValueError, match=r"m\.parquet lacks 5 utt_index"):
        run_clustering(tmp_path / "e.parquet", out, k1=3, manifest=tmp_path / "m.parquet")


def _write_manifest(path: Path, utt_index: np.ndarray, speakers: list[str | None]) -> None:
    pq.write_table(
        pa.table({"utt_index": pa.array(utt_index, pa.int64()), "speaker": pa.array(speakers, pa.string())}),
        path,
    )


def test_cluster_stage_of_a_later_round_reports_agreement_with_the_labels_it_trained_on(tmp_path: Path,
                                                                                       ray_session) -> None:
    from raysv.run_config import load_config
    from raysv.stages import KINDS
    from raysv.stages.base import Stage, StageContext

    x, y = speakers_data(n_speakers=10, per_speaker=12, seed=4)
    utt_index = np.arange(len(y), dtype=np.int64)
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml",
                      [f"runs={tmp_path}", "name=r", "cluster.k1=30", "cluster.k2=10", f"data.shards={tmp_path}"])
    layout = cfg.layout
    write_embeddings(layout.embeddings(1), utt_index, x)
    write_labels(layout.stage("round_0/cluster"), utt_index, y)  # round 1's model trained on the true speakers
    stage = Stage("round_1/cluster", "cluster", 1, "round_1/finetune", settings_round=2)
    result = KINDS["cluster"].run(StageContext(cfg, stage, layout))
    saved = json.loads((layout.stage("round_1/cluster") / "clusters.json").read_text())
    _, labels = read_labels(layout.labels(1))
    expected = normalized_mutual_info_score(y, labels)
    assert saved["previous_nmi"] == result.metrics["previous_nmi"] == pytest.approx(expected)
    row: dict = {}
    KINDS["cluster"].summarise(row, result.metrics)
    assert row["nmi_previous"] == saved["previous_nmi"]
