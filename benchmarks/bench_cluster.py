"""Speed and memory of raysv's clustering against bare faiss and scikit-learn.

Synthetic embeddings (a mixture of speakers around random unit vectors) are
clustered by:

(a) raysv ``cluster_embeddings`` (faiss spherical k-means -> fastcluster Ward of the centroids),
    and its k-means part alone (``kmeans``);
(b) bare ``faiss.Kmeans`` with the same iterations (goal: raysv's k-means within 1.3x);
(c) scikit-learn ``KMeans`` (n_init=1, same max_iter, algorithm='lloyd', tol=0 so
    every iteration runs, random init like faiss) + ``AgglomerativeClustering(ward)``
    on its centroids.

Then the memory of the Ward step alone at growing k1, for fastcluster's
``linkage_vector`` (raysv) and scikit-learn's dense Ward, extrapolated to the
reference k1 = 50,000. Each measurement runs in a fresh subprocess and reports
the growth of its peak RSS past the moment its input was in memory (VmHWM reset
through /proc/self/clear_refs, else ``ru_maxrss``; tracemalloc does not see
faiss' allocations). The last line is the speed-up over scikit-learn.

    python benchmarks/bench_cluster.py            # 200,000 x 256, k1 2,000 -> k2 500
    python benchmarks/bench_cluster.py --quick    # 20,000 x 256, k1 200 -> k2 50
    python benchmarks/bench_cluster.py --reference

``--reference`` rehearses the pseudo-labelling of VoxCeleb2 dev: first the agreement of
two-level k-means with flat k-means where flat is affordable (200,000 x 256 of 1,000
speakers, k1 5,000 -> Ward -> k2 1,200; NMI against the synthetic speakers), then the
reference size (1,092,009 x 256 of 5,994 speakers, k1 50,000 two-level -> Ward -> k2 7,500),
each step's wall time and peak RSS. The speakers vary in size (log-normal, VoxCeleb2's mean of
182 utterances) and in spread, and ``--spread`` is calibrated so that flat k-means -> Ward
lands at NMI 0.90-0.96 (the reference reports 0.955 on real embeddings). 20 iterations with
faiss' initialisation (the reference: 300 with k-means++). Last line: the total minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_embeddings(n: int, dim: int, speakers: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Utterances around one random unit vector per speaker (within-speaker cosine about 0.7)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, speakers, size=n)
    x = np.empty((n, dim), dtype=np.float32)
    step = 50_000
    for s in range(0, n, step):
        noise = rng.standard_normal((min(step, n - s), dim), dtype=np.float32) * np.float32(0.7 / np.sqrt(dim))
        x[s : s + step] = centres[y[s : s + step]] + noise
    return x, y


SPREAD = 1.4
"""Noise norm of ``--reference``'s speakers: flat k-means -> Ward at 200,000 x 256 of 1,000 speakers
then reaches NMI in 0.90-0.96."""


def make_speakers(n: int, dim: int, speakers: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Utterances of speakers of varied size and spread around random directions (rows un-normalised).

    Speaker sizes are log-normal (sigma 0.6, as VoxCeleb2's 50-1,000 utterances per speaker);
    each speaker's noise norm is ``spread`` times a factor in [0.75, 1.25]; the norms of the
    rows vary by 20 % as raw embeddings do.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((speakers, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 0.6, speakers)
    y = rng.choice(speakers, size=n, p=weights / weights.sum())
    scale = (spread * rng.uniform(0.75, 1.25, speakers) / np.sqrt(dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    step = 100_000
    for s in range(0, n, step):
        ys = y[s : s + step]
        noise = rng.standard_normal((len(ys), dim), dtype=np.float32) * scale[ys, None]
        norms = rng.uniform(0.8, 1.2, (len(ys), 1)).astype(np.float32)
        x[s : s + step] = (centres[ys] + noise) * norms
    return x, y


def make_centroids(m: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors grouped like k-means centroids of many speakers (about 4 per speaker)."""
    x, _ = make_embeddings(m, dim, max(1, m // 4), seed)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    """Peak RSS in MiB: VmHWM where readable, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return _peak_mb()


# ---------------------------------------------------------------- child side


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args: argparse.Namespace) -> None:
    """Run one method ``--repeat`` times in this (fresh) process and print one JSON line (best wall time)."""
    if args.child == "faiss_default":
        import faiss  # as installed: OpenBLAS picks its kernels by itself
    else:
        from raysv.pseudo.cluster import import_faiss

        faiss = import_faiss()
    import fastcluster  # noqa: F401
    import sklearn.cluster  # noqa: F401
    from sklearn.metrics import normalized_mutual_info_score

    from raysv.pseudo.cluster import cluster_embeddings, kmeans, ward_on_centroids

    if args.child.startswith("steps_"):
        steps(args)
        return
    if args.child.startswith("ahc_"):
        c = make_centroids(args.k1, args.dim, args.seed)

        def run() -> None:
            if args.child == "ahc_vector":
                ward_on_centroids(c, max(1, args.k1 // 4))
            else:
                from sklearn.cluster import AgglomerativeClustering

                AgglomerativeClustering(n_clusters=max(1, args.k1 // 4), linkage="ward").fit_predict(c)
    else:
        x = np.load(args.data)
        out: dict[str, Any] = {}

        def run() -> None:
            t0 = time.perf_counter()
            if args.child == "raysv":
                out["labels"] = cluster_embeddings(x, args.k1, args.k2, niter=args.niter, seed=args.seed)
            elif args.child == "raysv_kmeans":
                out["labels"] = kmeans(x, args.k1, niter=args.niter, seed=args.seed, metric="cosine")[1]
            elif args.child in ("faiss", "faiss_default"):
                xn = x.copy()
                faiss.normalize_L2(xn)
                km = faiss.Kmeans(x.shape[1], args.k1, niter=args.niter, spherical=True, seed=args.seed)
                km.train(xn)
                out["labels"] = km.index.search(xn, 1)[1].ravel()
            elif args.child == "sklearn":
                from sklearn.cluster import AgglomerativeClustering, KMeans

                xn = x / np.linalg.norm(x, axis=1, keepdims=True)
                km = KMeans(
                    n_clusters=args.k1, n_init=1, max_iter=args.niter, algorithm="lloyd", init="random",
                    tol=0.0, random_state=args.seed,
                ).fit(xn)
                out["kmeans_seconds"] = min(out.get("kmeans_seconds", np.inf), time.perf_counter() - t0)
                groups = AgglomerativeClustering(n_clusters=args.k2, linkage="ward").fit_predict(km.cluster_centers_)
                out["labels"] = groups[km.labels_]
            else:
                raise SystemExit(f"unknown method {args.child!r}")

    # Peak growth past the RSS with the input loaded; when the kernel lets us reset the
    # high-water mark, earlier peaks (imports, data generation) cannot hide it.
    base = _rss_mb() if _reset_peak() else _peak_mb()
    walls, cpus = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_seconds() - c0)
    result: dict[str, float] = {"seconds": min(walls), "cpu_seconds": min(cpus), "peak_mb": _peak_mb() - base}
    if not args.child.startswith("ahc_"):
        y = np.load(args.data.replace(".npy", "_y.npy"))
        result["nmi"] = float(normalized_mutual_info_score(y, out["labels"]))
        if "kmeans_seconds" in out:
            result["kmeans_seconds"] = float(out["kmeans_seconds"])
    print(json.dumps(result))


def steps(args: argparse.Namespace) -> None:
    """k-means, Ward of the centroids and the label assignment as raysv runs them, each timed alone."""
    from sklearn.metrics import normalized_mutual_info_score

    from raysv.pseudo.cluster import cut_linkage, drop_empty, kmeans, ward_linkage

    method = args.child.removeprefix("steps_")
    x = np.load(args.data)
    out: dict[str, Any] = {"method": method}
    _reset_peak()
    t0 = time.perf_counter()
    centroids, assignment = kmeans(x, args.k1, niter=args.niter, seed=args.seed, metric=args.metric, method=method)
    centroids, assignment, out["empty"] = drop_empty(centroids, assignment)
    out["kmeans"] = {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb()}
    del x
    _reset_peak()
    t0 = time.perf_counter()
    z = ward_linkage(centroids)
    out["ward"] = {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb()}
    _reset_peak()
    t0 = time.perf_counter()
    labels = cut_linkage(z, args.k2)[assignment]
    out["assign"] = {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb()}
    y = np.load(args.data.replace(".npy", "_y.npy"))
    if args.ward_knn:  # what a shorter Ward would give: scikit-learn's, on a 30-NN graph of the centroids
        from sklearn.cluster import AgglomerativeClustering
        from sklearn.neighbors import kneighbors_graph

        _reset_peak()
        t0 = time.perf_counter()
        graph = kneighbors_graph(centroids, 30, include_self=False)
        groups = AgglomerativeClustering(args.k2, linkage="ward", connectivity=graph).fit_predict(centroids)
        out["ward_knn"] = {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(),
                           "nmi": float(normalized_mutual_info_score(y, groups[assignment]))}
    out["nmi"] = float(normalized_mutual_info_score(y, labels))
    out["nmi_kmeans"] = float(normalized_mutual_info_score(y, assignment))
    out["clusters"] = int(len(np.unique(labels)))
    print(json.dumps(out))


def reference(args: argparse.Namespace) -> None:
    """Two-level against flat k-means where flat is affordable, then the reference size, step by step."""
    print(f"cores {os.cpu_count()}; {args.niter} iterations, {args.metric} k-means, spread {args.spread}")
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "x.npy")
        for n, speakers, k1, k2, methods in (
            (200_000, 1_000, 5_000, 1_200, ("flat", "two_level")),
            (1_092_009, 5_994, 50_000, 7_500, ("two_level",)),
        ):
            x, y = make_speakers(n, args.dim, speakers, args.spread, args.seed)
            np.save(data, x)
            np.save(data.replace(".npy", "_y.npy"), y)
            del x, y
            print(f"\n{n:,} x {args.dim} of {speakers:,} speakers, k1 {k1:,} -> Ward -> k2 {k2:,}")
            print(f"{'method':<11}{'step':<9}{'wall s':>9}{'peak RSS MB':>13}")
            res = {}
            for m in methods:
                r = measure(f"steps_{m}", args, data, k1=k1, k2=k2)
                res[m] = r
                for step in ("kmeans", "ward", "assign"):
                    print(f"{m:<11}{step:<9}{r[step]['seconds']:>9.1f}{r[step]['peak_mb']:>13.0f}")
                whole = sum(r[s]["seconds"] for s in ("kmeans", "ward", "assign"))
                peak = max(r[s]["peak_mb"] for s in ("kmeans", "ward", "assign"))
                print(f"{m:<11}{'whole':<9}{whole:>9.1f}{peak:>13.0f}   NMI {r['nmi']:.3f} "
                      f"(k-means alone {r['nmi_kmeans']:.3f}), {r['clusters']:,} clusters, "
                      f"{r['empty']} empty k-means clusters dropped")
                if "ward_knn" in r:
                    w = r["ward_knn"]
                    print(f"{'':<11}{'(Ward on a 30-NN graph of the centroids, scikit-learn, instead: '}"
                          f"{w['seconds']:.1f} s, {w['peak_mb']:.0f} MB, NMI {w['nmi']:.3f})")
                if n > 1_000_000:
                    total = whole
            if "flat" in res:
                flat, two = res["flat"]["nmi"], res["two_level"]["nmi"]
                calibrated = "in" if 0.90 <= flat <= 0.96 else "OUTSIDE"
                print(f"flat -> Ward NMI {flat:.3f} ({calibrated} the calibration range 0.90-0.96); "
                      f"two-level - flat: {two - flat:+.3f} NMI (goal within 0.01); two-level / flat time: "
                      f"{sum(res['two_level'][s]['seconds'] for s in ('kmeans', 'ward', 'assign')) / sum(res['flat'][s]['seconds'] for s in ('kmeans', 'ward', 'assign')):.2f}x")
    print(f"reference-scale pseudo-labelling (1,092,009 x {args.dim} -> 50,000 -> 7,500): {total / 60:.1f} min")


# ---------------------------------------------------------------- parent side


def measure(method: str, args: argparse.Namespace, data: str = "", k1: int | None = None,
            k2: int | None = None) -> dict[str, Any]:
    """Run ``method`` in a fresh interpreter and return its JSON figures."""
    cmd = [
        sys.executable, __file__, "--child", method, "--data", data,
        "--k1", str(k1 if k1 is not None else args.k1), "--k2", str(k2 if k2 is not None else args.k2),
        "--niter", str(args.niter), "--seed", str(args.seed), "--dim", str(args.dim),
        "--repeat", str(args.repeat), "--metric", args.metric, *(["--ward-knn"] if args.reference else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="utterances")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--speakers", type=int, default=0,
                    help="speakers in the mixture (default k2 / 1.25, the reference's 7,500 clusters for 5,994 speakers)")
    ap.add_argument("--k1", type=int, default=2_000)
    ap.add_argument("--k2", type=int, default=500)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per method, best wall time kept (shared machines)")
    ap.add_argument("--ahc-sizes", default="2000,4000,8000,16000", help="k1 values for the Ward memory scan")
    ap.add_argument("--dense-max", type=int, default=16_000, help="largest k1 for scikit-learn's dense Ward")
    ap.add_argument("--ward-only", action="store_true", help="only the Ward memory scan")
    ap.add_argument("--quick", action="store_true", help="20,000 x 256, k1 200 -> k2 50, Ward scan to 4,000")
    ap.add_argument("--reference", action="store_true",
                    help="two-level vs flat agreement, then 1,092,009 x 256 -> 50,000 -> 7,500 step by step")
    ap.add_argument("--spread", type=float, default=SPREAD, help="--reference: noise norm of a speaker's utterances")
    ap.add_argument("--ward-knn", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--metric", default="euclidean", help="--reference: k-means metric (the reference: euclidean)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.reference:
        reference(args)
        return
    if args.quick:
        args.n, args.k1, args.k2 = 20_000, 200, 50
        args.ahc_sizes = "1000,2000,4000"
        args.dense_max = 4_000

    if args.speakers <= 0:
        args.speakers = max(1, round(args.k2 / 1.25))
    print(f"cores {os.cpu_count()}; n {args.n} x {args.dim}, {args.speakers} speakers, "
          f"k1 {args.k1} -> k2 {args.k2}, {args.niter} iterations")
    if args.ward_only:
        ward_scan(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "x.npy")
        x, y = make_embeddings(args.n, args.dim, args.speakers, args.seed)
        np.save(data, x)
        np.save(data.replace(".npy", "_y.npy"), y)
        del x
        res = {m: measure(m, args, data) for m in ("raysv", "raysv_kmeans", "faiss", "faiss_default", "sklearn")}

    print(f"{'method':<44}{'wall s':>9}{'CPU s':>9}{'peak MB':>9}{'NMI':>7}")
    names = {
        "raysv": "raysv cluster_embeddings (k1 -> k2)",
        "raysv_kmeans": "raysv kmeans, cosine (k1)",
        "faiss": "bare faiss.Kmeans, same OpenBLAS kernels (k1)",
        "faiss_default": "bare faiss.Kmeans, OpenBLAS as detected (k1)",
        "sklearn": "sklearn KMeans + Ward (k1 -> k2)",
    }
    for m, r in res.items():
        print(f"{names[m]:<44}{r['seconds']:>9.2f}{r['cpu_seconds']:>9.2f}{r['peak_mb']:>9.0f}{r['nmi']:>7.3f}")
    print(f"  (sklearn KMeans part {res['sklearn']['kmeans_seconds']:.2f} s wall)")
    kmeans_ratio = res["raysv_kmeans"]["seconds"] / res["faiss"]["seconds"]
    print(f"raysv k-means / bare faiss time: {kmeans_ratio:.2f}x wall, "
          f"{res['raysv_kmeans']['cpu_seconds'] / res['faiss']['cpu_seconds']:.2f}x CPU (goal <= 1.3)")
    print(f"bare faiss with detected / with raysv's OpenBLAS kernels: "
          f"{res['faiss_default']['seconds'] / res['faiss']['seconds']:.2f}x wall")
    print(f"raysv k-means / bare faiss peak memory: "
          f"{res['raysv_kmeans']['peak_mb'] / max(res['faiss']['peak_mb'], 1e-9):.2f}x")
    print(f"sklearn / raysv peak memory: {res['sklearn']['peak_mb'] / max(res['raysv']['peak_mb'], 1e-9):.2f}x")

    ward_scan(args)
    print(f"sklearn / raysv CPU time: {res['sklearn']['cpu_seconds'] / res['raysv']['cpu_seconds']:.2f}x")
    speedup = res["sklearn"]["seconds"] / res["raysv"]["seconds"]
    print(f"speedup_vs_sklearn {speedup:.2f}")


def ward_scan(args: argparse.Namespace) -> None:
    """Memory and time of the Ward step alone at growing k1, extrapolated to the reference k1."""
    sizes = [int(s) for s in args.ahc_sizes.split(",") if s]
    print(f"\nWard step alone ({args.dim}-d centroids -> k1/4 groups): growth of peak RSS")
    print(f"{'k1':>8}{'raysv s':>10}{'CPU s':>8}{'raysv MB':>10}{'sklearn s':>10}{'CPU s':>8}{'sklearn MB':>11}"
          f"{'dist. matrix MB':>17}")
    vec: list[tuple[int, float, float]] = []
    for m in sizes:
        v = measure("ahc_vector", args, k1=m)
        vec.append((m, v["peak_mb"], v["cpu_seconds"]))
        d = measure("ahc_dense", args, k1=m) if m <= args.dense_max else None
        dense_txt = (
            f"{d['seconds']:>10.2f}{d['cpu_seconds']:>8.2f}{d['peak_mb']:>11.1f}" if d else f"{'-':>10}{'-':>8}{'-':>11}"
        )
        print(f"{m:>8}{v['seconds']:>10.2f}{v['cpu_seconds']:>8.2f}{v['peak_mb']:>10.1f}{dense_txt}"
              f"{m * (m - 1) / 2 * 8 / 2**20:>17.0f}")
    target = 50_000
    ks = np.array([v[0] for v in vec], dtype=float)
    mem = np.array([v[1] for v in vec])
    secs = np.array([v[2] for v in vec])
    slope, icpt = np.polyfit(ks, mem, 1) if len(ks) > 1 else (mem[0] / ks[0], 0.0)
    t_coef = float(secs[-1] / ks[-1] ** 2)
    print(f"extrapolated to k1 = {target}: raysv Ward ~{slope * target + icpt:.0f} MB "
          f"(linear fit), ~{t_coef * target**2 / 60:.0f} CPU min (quadratic in k1 from the largest); "
          f"a dense float64 distance matrix alone needs {target * (target - 1) / 2 * 8 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
