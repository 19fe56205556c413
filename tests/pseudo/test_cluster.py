"""Pseudo-labels: k-means + Ward on synthetic speakers, file formats, and the Ray clustering stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from raysv.artifacts.labels import num_classes
from raysv.errors import InputError
from raysv.pseudo.cluster import (
    _cut_first_merges,
    _openblas_coretype,
    cluster_embeddings,
    estimate_clusters,
    kmeans,
    pseudo_labels,
    silhouette_curve,
    ward_on_centroids,
)
from raysv.pseudo.diagnostics import cluster_diagnostics, label_agreement


def speakers_data(
    n_speakers: int = 40, per_speaker: int = 30, dim: int = 64, noise: float = 0.08, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Utterances scattered around one random unit vector per speaker."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_speakers, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_speakers), per_speaker)
    x = centres[y] + noise * rng.normal(size=(len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


# ---------------------------------------------------------------- clustering


def test_kmeans_then_ward_recovers_speakers() -> None:
    x, y = speakers_data()
    labels = cluster_embeddings(x, k1=120, k2=40, seed=1)
    assert labels.dtype == np.int32 and labels.shape == y.shape
    nmi = normalized_mutual_info_score(y, labels)
    assert nmi >= 0.95
    assert set(np.unique(labels)) == set(range(40))
    diag = cluster_diagnostics(labels, [f"spk{s}" for s in y])
    assert diag["num_clusters"] == 40 and diag["dropped"] == 0
    assert diag["nmi"] == pytest.approx(nmi)
    assert diag["ari"] == pytest.approx(adjusted_rand_score(y, labels))
    assert sum(diag["sizes"]) == len(y) and sum(diag["size_histogram"].values()) == 40


def test_label_agreement_matches_sklearn_over_rows_labelled_in_both() -> None:
    rng = np.random.default_rng(0)
    idx = rng.permutation(200).astype(np.int64)  # one labelling in another row order, ids renamed
    new = rng.integers(0, 12, size=200)
    old_idx = np.arange(50, 250, dtype=np.int64)
    truth = dict(zip(idx.tolist(), new.tolist()))
    old = np.array([(5 * truth[i] + 1) % 12 if i in truth else 5 for i in old_idx.tolist()])
    old[:10] = -1  # dropped in the previous round: not compared
    new_by = dict(zip(idx.tolist(), new.tolist()))
    both = [(new_by[i], o) for i, o in zip(old_idx.tolist(), old.tolist()) if i in new_by and o >= 0]
    a, b = map(np.array, zip(*both))
    got = label_agreement(idx, new, old_idx, old)
    assert got["previous_utterances"] == len(both) == 140
    assert got["previous_nmi"] == pytest.approx(1.0)  # the same partition under other names
    noisy = new.copy()
    noisy[:60] = rng.integers(0, 12, size=60)
    got = label_agreement(idx, noisy, old_idx, old)
    a = np.array([dict(zip(idx.tolist(), noisy.tolist()))[i] for i, o in zip(old_idx.tolist(), old.tolist())
                  if i in new_by and o >= 0])
    assert got["previous_nmi"] == pytest.approx(normalized_mutual_info_score(b, a)) and got["previous_nmi"] < 0.95
    assert got["previous_ari"] == pytest.approx(adjusted_rand_score(b, a))
    assert label_agreement(idx, new, old_idx[:0], old[:0]) == {"previous_utterances": 0}


def test_kmeans_uses_every_point() -> None:
    # 3000 points, k=3: faiss' default would train on 768 of them. With every
    # point used, each converged centroid is the normalised mean of all its members.
    x, _ = speakers_data(n_speakers=3, per_speaker=1000, dim=16, noise=0.5, seed=3)
    centroids, assign = kmeans(x, 3, niter=60, seed=0, metric="cosine")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in range(3):
        mean = xn[assign == c].mean(axis=0)
        np.testing.assert_allclose(centroids[c], mean / np.linalg.norm(mean), atol=2e-5)
    np.testing.assert_array_equal(assign, np.argmax(xn @ centroids.T, axis=1))


@pytest.mark.parametrize("seed,n,k2", [(0, 60, 7), (1, 150, 20), (2, 300, 45), (3, 40, 2)])
def test_ward_matches_dense_ward(seed: int, n: int, k2: int) -> None:
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(n, 12)).astype(np.float32)
    ours = ward_on_centroids(centroids, k2)
    assert len(np.unique(ours)) == k2 and ours.min() == 0 and ours.max() == k2 - 1
    dense = fcluster(linkage(centroids.astype(np.float64), method="ward"), k2, "maxclust")
    assert adjusted_rand_score(dense, ours) == 1.0
    sk = AgglomerativeClustering(n_clusters=k2, linkage="ward").fit_predict(centroids)
    assert adjusted_rand_score(sk, ours) == 1.0


def test_ward_with_tied_merges_gives_exactly_k2() -> None:
    # Three identical pairs: every pair merges at the same height, so a height
    # threshold cannot stop after one or two of them.
    pts = np.array([[0, 0], [0, 1], [10, 0], [10, 1], [20, 0], [20, 1]], dtype=np.float64)
    z = linkage(pts, method="ward")
    assert len(np.unique(fcluster(z, 4, "maxclust"))) != 4
    groups = ward_on_centroids(pts, 4)
    assert len(np.unique(groups)) == 4
    pairs = {frozenset(np.flatnonzero(groups == g)) for g in np.unique(groups)}
    # each group is a whole pair or one point of a pair, never points of different pairs
    for g in pairs:
        assert len({int(pts[i, 0]) for i in g}) == 1


def test_cut_first_merges_agrees_with_fcluster() -> None:
    rng = np.random.default_rng(5)
    pts = rng.normal(size=(80, 5))
    z = linkage(pts, method="ward")
    for k in (1, 2, 9, 33, 80):
        assert adjusted_rand_score(fcluster(z, k, "maxclust"), _cut_first_merges(z, 80, k)) == 1.0


def test_min_cluster_size_drops_small_clusters_and_renumbers() -> None:
    rng = np.random.default_rng(7)
    centres = np.eye(6, 32) * 1.0
    sizes = [50, 3, 40, 2, 25, 4]
    y = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
    x = (centres[y] + 0.02 * rng.normal(size=(len(y), 32))).astype(np.float32)
    # k1 = N makes every point a centroid, so Ward alone decides, without k-means luck on tiny clusters
    full = cluster_embeddings(x, k1=len(y), k2=6)
    assert normalized_mutual_info_score(y, full) == pytest.approx(1.0)
    assert np.bincount(full).tolist() == sorted(sizes, reverse=True)  # largest first
    labels = cluster_embeddings(x, k1=len(y), k2=6, min_cluster_size=5)
    assert (labels[np.isin(y, [1, 3, 5])] == -1).all()
    assert sorted(np.unique(labels[labels >= 0]).tolist()) == [0, 1, 2]
    assert num_classes(labels) == 3
    # largest kept speaker is label 0, then 1, then 2
    assert labels[y == 0][0] == 0 and labels[y == 2][0] == 1 and labels[y == 4][0] == 2
    diag = cluster_diagnostics(labels, None)
    assert diag["dropped"] == 9 and diag["num_clusters"] == 3 and diag["size_min"] == 25
    assert "nmi" not in diag


def test_k1_none_is_ward_of_the_utterances_themselves() -> None:
    """k1: null skips k-means: the labels are scipy's Ward cut of the unit rows (cosine)."""
    x, _ = speakers_data(n_speakers=12, per_speaker=15, noise=0.4, seed=3)
    labels, info = pseudo_labels(x, k1=None, k2=12, metric="cosine")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = fcluster(linkage(unit.astype(np.float64), method="ward"), t=12, criterion="maxclust")
    assert adjusted_rand_score(expected, labels) == 1.0
    assert info["kmeans"] == "none" and len(np.unique(labels)) == 12


def test_ward_of_the_utterances_is_purer_than_of_small_kmeans_groups() -> None:
    """80 overlapping speakers of 10-19 utterances: k-means into a quarter as many groups as utterances
    weighs each centroid as one point in Ward, however many utterances it holds; Ward of the
    utterances themselves recovers the speakers better (NMI 0.84-0.87 against 0.79-0.81, seeds 0-2)."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 20, 80)
    y = np.repeat(np.arange(80), sizes)
    x = np.repeat(rng.standard_normal((80, 64)), sizes, axis=0) + rng.standard_normal((sizes.sum(), 64)) * 1.5
    direct = normalized_mutual_info_score(y, pseudo_labels(x, k1=None, k2=120, metric="cosine")[0])
    via_kmeans = normalized_mutual_info_score(y, pseudo_labels(x, k1=len(x) // 4, k2=120, metric="cosine")[0])
    assert direct > via_kmeans + 0.02, (direct, via_kmeans)


def test_k1_none_bad_settings_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = speakers_data(n_speakers=4, per_speaker=5, dim=8)
    with pytest.raises(InputError, match=r"k2=20: with k1=null Ward merges the 20 utterances"):
        pseudo_labels(x, k1=None, k2=20)
    with pytest.raises(InputError, match=r"k1=None and k2=None: every utterance would be its own class"):
        pseudo_labels(x, k1=None, k2=None)
    with pytest.raises(InputError, match=r"k2_fallback=20: with k1=null Ward merges the 20 utterances"):
        pseudo_labels(x, k1=None, k2="auto", k2_fallback=20)
    with pytest.raises(ValueError, match=r"k2 must be an integer or None, got 'x'"):
        pseudo_labels(x, k1=None, k2="x")
    monkeypatch.setattr("raysv.pseudo.cluster.WARD_UTTERANCES_MAX", 10)
    with pytest.raises(InputError, match=r"20 utterances is more than 10; set k1"):
        pseudo_labels(x, k1=None, k2=4)


def test_labels_are_deterministic_for_a_seed() -> None:
    x, _ = speakers_data(n_speakers=20, per_speaker=10, noise=0.3, seed=11)
    a = cluster_embeddings(x, k1=50, k2=20, seed=4)
    b = cluster_embeddings(x, k1=50, k2=20, seed=4)
    np.testing.assert_array_equal(a, b)


def test_bad_inputs_name_the_problem() -> None:
    x, _ = speakers_data(n_speakers=4, per_speaker=5, dim=8)
    with pytest.raises(ValueError, match=r"k1=21 is larger than the number of utterances \(20\)"):
        cluster_embeddings(x, k1=21)
    with pytest.raises(ValueError, match=r"k2=10: Ward merges the k1=10 k-means centroids; k2 must be between 1 and 10 \(excluded\) or None"):
        cluster_embeddings(x, k1=10, k2=10)
    with pytest.raises(InputError, match=r"k2=0: Ward merges the k1=10 k-means centroids; k2 must be between 1 and 10"):
        cluster_embeddings(x, k1=10, k2=0)
    with pytest.raises(ValueError, match=r"k1 must be >= 1"):
        cluster_embeddings(x, k1=0)
    with pytest.raises(ValueError, match=r"2-D"):
        cluster_embeddings(x[0], k1=1)
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 rows with NaN or inf.*\[3, 7\]"):
        cluster_embeddings(bad, k1=4)
    zero = x.copy()
    zero[5] = 0
    with pytest.raises(ValueError, match=r"1 all-zero rows"):
        cluster_embeddings(zero, k1=4)
    with pytest.raises(ValueError, match=r"k2 must be between 1 and the number of centroids \(5\)"):
        ward_on_centroids(x[:5], 6)


def test_use_gpu_true_without_a_faiss_gpu_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    from raysv.pseudo.cluster import import_faiss

    if import_faiss().get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    x, _ = speakers_data(n_speakers=5, per_speaker=10, dim=8)
    with caplog.at_level("WARNING", logger="raysv.pseudo.cluster"):
        on_true = cluster_embeddings(x, k1=5, use_gpu=True)
    assert "faiss sees no GPU" in caplog.text
    np.testing.assert_array_equal(on_true, cluster_embeddings(x, k1=5, use_gpu=False))


def test_faiss_blas_uses_the_cpu_vector_kernels() -> None:
    # faiss-cpu's bundled OpenBLAS falls back to SSE3 kernels on CPUs it does not know
    expected = _openblas_coretype()
    if expected is None or "OPENBLAS_CORETYPE" in os.environ:
        pytest.skip("no AVX2/AVX-512 x86 CPU detected, or OPENBLAS_CORETYPE set by the user")
    code = (
        "import json, os\n"
        "from raysv.pseudo.cluster import import_faiss\n"
        "import_faiss()\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps({'env': 'OPENBLAS_CORETYPE' in os.environ, 'blas': [(i['filepath'], "
        "i.get('architecture')) for i in threadpool_info() if i['internal_api'] == 'openblas']}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    faiss_blas = [arch for path, arch in info["blas"] if "faiss" in path]
    if not faiss_blas:
        pytest.skip("this faiss build does not bundle OpenBLAS")
    assert faiss_blas == [expected]
    assert info["env"] is False  # set only around the import


# ---------------------------------------------------------------- file formats


# ---------------------------------------------------------------- Ray stage




@pytest.mark.parametrize(("speakers", "via_kmeans"), [(20, True), (60, True), (200, True), (20, False), (60, False)])
def test_k2_auto_estimates_the_number_of_speakers(speakers: int, via_kmeans: bool) -> None:
    """k2: auto — the Ward cut of best silhouette, within ±30 % of the truth, from k-means centroids or
    from the utterances themselves (k1: null)."""
    rng = np.random.default_rng(speakers)
    sizes = rng.integers(10, 40, speakers)  # unequal speakers
    centres = rng.standard_normal((speakers, 64))
    x = np.repeat(centres, sizes, axis=0) + rng.standard_normal((sizes.sum(), 64)) * 0.9
    k1 = min(6 * speakers, len(x) // 3) if via_kmeans else None
    labels, info = pseudo_labels(x, k1=k1, k2="auto", metric="cosine", k2_factor=1.0)
    assert max(k for k, _ in info["silhouette"]) <= len(x) // 4  # four utterances a group at least
    assert abs(info["k2_estimate"] - speakers) <= 0.3 * speakers, info
    assert info["k2_used"] == info["k2_estimate"] == len(np.unique(labels))
    if speakers == 20 and via_kmeans:  # over-clustering by the factor (the Ray stage test checks it again)
        _, over = pseudo_labels(x, k1=6 * speakers, k2="auto", metric="cosine", k2_factor=1.5)
        assert over["k2_used"] == round(1.5 * over["k2_estimate"])


def test_k2_auto_counts_speakers_who_fill_half_the_centroids() -> None:
    """80 overlapping speakers of 10-19 utterances, 4 k-means clusters each (a corpus' size over k1 of
    the demo): the silhouette falls only slowly past the count, so it shows as a count only where the
    curve runs on past twice the speakers, up to the number of centroids."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 20, 80)
    x = np.repeat(rng.standard_normal((80, 64)), sizes, axis=0) + rng.standard_normal((sizes.sum(), 64)) * 1.5
    _, info = pseudo_labels(x, k1=320, k2="auto", metric="cosine")
    assert abs(info["k2_estimate"] - 80) <= 0.3 * 80, info
    assert info["silhouette"][-1][0] > 160
    assert estimate_clusters([(k, v) for k, v in info["silhouette"] if k <= 160]) is None  # the range before


def test_silhouette_curve_matches_sklearn_on_the_points() -> None:
    """Each point of the curve is the silhouette of the utterances under that Ward cut."""
    x, _ = speakers_data(n_speakers=12, per_speaker=15, noise=0.3)
    centroids, assignment = kmeans(x, 40, niter=10, seed=0, metric="euclidean")
    z = linkage(centroids.astype(np.float64), method="ward")
    curve = silhouette_curve(x, z, assignment, metric="euclidean")
    assert [k for k, _ in curve][:3] == [2, 3, 4] and 20 < curve[-1][0] <= 40  # up to the centroids
    for k, value in curve[::4]:
        groups = fcluster(z, t=k, criterion="maxclust")[assignment]
        assert value == pytest.approx(silhouette_score(x, groups, metric="euclidean"), abs=1e-4)


def test_estimate_is_a_peak_that_stands_out_among_ten_groups_or_more() -> None:
    """A best silhouette at either end of the range, below ten groups, or barely above the rest of the curve is no count."""
    rising = [(k, 0.1 + 0.01 * k) for k in range(2, 30)]
    assert estimate_clusters(rising) is None
    assert estimate_clusters([(k, 0.5 - 0.01 * k) for k in range(2, 30)]) is None
    peaked = [(k, 0.3 - 0.002 * (k - 17) ** 2) for k in range(2, 30)]
    assert estimate_clusters(peaked) == 17
    assert estimate_clusters(peaked, prominence=0.1) is None  # 0.098 above the cut into 10 groups
    assert estimate_clusters([(k, 0.4 - 0.002 * (k - 6) ** 2) for k in range(2, 30)]) is None  # a peak at 6 groups
    bump = [(k, 0.2 + (0.03 if k == 20 else 0.0)) for k in range(2, 60)]
    assert estimate_clusters(bump) is None and estimate_clusters(bump, prominence=0.02) == 20
    # Two real curves (round-1 embeddings of the toy corpora, from clusters.json): the tube voices'
    # (80 speakers) is best at 3 groups and flat beyond; the formant voices' (40) peaks at 43.
    tube = [(2, 0.2214), (3, 0.2682), (4, 0.2366), (5, 0.2601), (6, 0.2665), (7, 0.2404), (8, 0.2436), (9, 0.2397), (10, 0.2217), (11, 0.2185), (12, 0.2207), (13, 0.2127), (14, 0.2031), (15, 0.2019), (16, 0.1994), (17, 0.1986), (19, 0.198), (20, 0.2037), (22, 0.1897), (23, 0.1917), (25, 0.2016), (27, 0.203), (30, 0.2039), (32, 0.2049), (34, 0.2067), (37, 0.2071), (40, 0.2013), (43, 0.2079), (47, 0.2064), (51, 0.2088), (55, 0.1995), (59, 0.2045), (64, 0.2029), (69, 0.2054), (74, 0.2041), (80, 0.2016), (87, 0.2063), (94, 0.2088), (101, 0.2111), (109, 0.2159), (118, 0.2156), (128, 0.2062), (138, 0.2059), (149, 0.208)]
    formant = [(2, 0.2462), (3, 0.2147), (4, 0.2171), (5, 0.1928), (6, 0.1975), (7, 0.1941), (8, 0.2147), (9, 0.2094), (10, 0.2233), (11, 0.2314), (12, 0.235), (13, 0.2412), (14, 0.2473), (15, 0.2454), (16, 0.2586), (17, 0.2682), (19, 0.2804), (20, 0.2865), (22, 0.2977), (23, 0.2965), (25, 0.3063), (27, 0.3051), (30, 0.3105), (32, 0.3057), (34, 0.3127), (37, 0.3152), (40, 0.3177), (43, 0.3202), (47, 0.3154), (51, 0.3145), (55, 0.3113), (59, 0.3044), (64, 0.2975), (69, 0.2908), (74, 0.2854), (80, 0.267), (87, 0.2499), (94, 0.2455), (101, 0.2307), (109, 0.2206), (118, 0.2021), (128, 0.1896), (138, 0.1784), (149, 0.1723)]
    assert estimate_clusters(tube) is None and estimate_clusters(tube, min_k=2, prominence=0.0) == 3  # the rule before
    assert estimate_clusters(formant) == 43


def test_k2_auto_without_a_count_falls_back_or_stops() -> None:
    """Points spread evenly over the sphere have no speakers to count: k2_fallback, else an error naming k2."""
    x = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float32)
    labels, info = pseudo_labels(x, k1=100, k2="auto", k2_fallback=30, metric="cosine")
    assert info["k2_estimate"] is None and info["k2_used"] == 30 == len(np.unique(labels))
    assert len(info["silhouette"]) > 10
    with pytest.raises(InputError, match="k2=auto.*no count of speakers.*k2_fallback"):
        pseudo_labels(x, k1=100, k2="auto", metric="cosine")
    with pytest.raises(ValueError, match=r"k2_fallback=100: Ward merges the k1=100 k-means centroids; k2_fallback must be between 1 and 100"):
        pseudo_labels(x, k1=100, k2="auto", k2_fallback=100, metric="cosine")


def test_split_counts_sum_to_k_within_each_cluster():
    from raysv.pseudo.cluster import split_counts

    sizes = np.array([5000, 40, 0, 3, 1200, 1])
    counts = split_counts(sizes, 300)
    assert counts.sum() == 300 and counts[2] == 0
    assert (counts[sizes > 0] >= 1).all() and (counts <= sizes).all()
    assert counts[0] > counts[4] > counts[1] >= counts[3]  # proportional to size
    assert split_counts(np.array([2, 3]), 5).tolist() == [2, 3]
    with pytest.raises(ValueError, match="cannot split"):
        split_counts(np.array([2, 3]), 6)


def uneven_speakers(n: int = 6000, speakers: int = 30, dim: int = 256, seed: int = 0):
    """Speakers of log-normal sizes around random directions (on these, faiss' own two-level split fails)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((speakers, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 0.6, speakers)
    y = rng.choice(speakers, size=n, p=weights / weights.sum())
    x = centres[y] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return x.astype(np.float32), y


def test_two_level_kmeans_matches_flat_on_uneven_speakers():
    """faiss' ``two_level_clustering`` gives a coarse cluster smaller than N / k no centroid and then
    fails inside faiss on data like these; raysv's split gives each at least one."""
    from sklearn.metrics import normalized_mutual_info_score

    from raysv.pseudo.cluster import kmeans, pseudo_labels

    x, y = uneven_speakers()
    centroids, assignment = kmeans(x, 300, metric="euclidean", method="two_level")
    assert centroids.shape == (300, 256) and assignment.min() >= 0 and assignment.max() < 300
    flat, _ = pseudo_labels(x, 300, 30, metric="euclidean", method="flat")
    two, info = pseudo_labels(x, 300, 30, metric="euclidean", method="two_level")
    assert info["kmeans"] == "two_level"
    nmi_two, nmi_flat = normalized_mutual_info_score(y, two), normalized_mutual_info_score(y, flat)
    assert nmi_two > 0.9 and nmi_two >= nmi_flat - 0.02, (nmi_two, nmi_flat)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_keep_labels_the_clearest_rows_and_they_are_purer(metric: str) -> None:
    """cluster.keep: the kept half sits far from the other groups, so it is purer than the dropped half."""
    x, y = speakers_data(n_speakers=30, per_speaker=40, noise=0.2, seed=3)  # full purity about 0.86
    full, _ = pseudo_labels(x, k1=120, k2=30, metric=metric)
    half, _ = pseudo_labels(x, k1=120, k2=30, metric=metric, keep=0.5)
    kept = half >= 0
    assert kept.sum() == len(x) // 2
    dropped = ~kept

    def purity(labels: np.ndarray, truth: np.ndarray) -> float:
        return sum(np.bincount(truth[labels == g]).max() for g in np.unique(labels)) / len(labels)

    assert purity(full[kept], y[kept]) > purity(full[dropped], y[dropped]) + 0.1
    # the kept rows keep their groups (renumbered): the same partition as the full labelling
    assert adjusted_rand_score(full[kept], half[kept]) == 1.0


def test_confident_rows_margin_against_a_direct_computation() -> None:
    from raysv.pseudo.cluster import confident_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    groups = rng.integers(0, 5, 300)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([unit[groups == g].mean(0) for g in range(5)])
    sim = unit @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    own = sim[np.arange(300), groups]
    sim[np.arange(300), groups] = -np.inf
    expected = np.argsort(-(own - sim.max(1)))[:90]
    assert set(np.flatnonzero(confident_rows(x, groups, 0.3))) == set(expected)
    assert confident_rows(x, groups, 1.0).all()
    with pytest.raises(ValueError, match="keep"):
        confident_rows(x, groups, 0.0)


def test_cluster_keep_outside_zero_one_is_a_config_error() -> None:
    from raysv.config import ConfigError
    from raysv.pseudo.cluster import ClusterConfig

    with pytest.raises(ConfigError, match="cluster.keep"):
        ClusterConfig(k1=10, k2=5, keep=1.5).validate()
