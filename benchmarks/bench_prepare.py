"""Throughput of `raysv prepare` (Ray tasks) against a plain single-process loop.

Both read the same files, resample to 16 kHz, FLAC-encode and write Parquet.
Prepare runs twice on a fresh output folder: once with cold Ray workers
(start-up included, what a small corpus sees) and once with warm ones (the
steady state of a large corpus). Prints files/s of each; the last line is the
warm ratio, prepare files/s / single-process files/s.

    python benchmarks/bench_prepare.py                    # 1,000 synthetic 3 s files
    python benchmarks/bench_prepare.py --audio-root DIR   # your own corpus
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from raysv.audio.io import encode_flac, is_audio_file, read_audio


def make_corpus(root: Path, num: int, seconds: float, rate: int, seed: int = 0) -> None:
    """Speech-like noise (band-limited, syllable-rate envelope) in VoxCeleb layout, ~20 files per speaker."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    for i in range(num):
        spk, sess, utt = i // 20, (i % 20) // 5, i % 5
        noise = rng.standard_normal(n)
        smooth = np.convolve(noise, np.ones(4) / 4, mode="same")
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi))
        wave = (0.2 * smooth * envelope).astype(np.float32)
        path = root / f"id{spk:05d}" / f"sess{sess}" / f"{utt:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, np.clip(wave, -1, 1), rate, subtype="PCM_16")


def list_audio(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and is_audio_file(p))


def single_process(files: list[Path], root: Path, out: Path, sample_rate: int, shard_size: int) -> int:
    """The baseline: one loop, no Ray; returns how many rows were written."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, bytes, int]] = []
    written = 0

    def flush() -> None:
        nonlocal rows, written
        if not rows:
            return
        table = pa.table(
            {
                "utt_index": pa.array(np.arange(written, written + len(rows)), pa.int64()),
                "utt_id": [r[0] for r in rows],
                "speaker": [r[1] for r in rows],
                "audio": pa.array([r[2] for r in rows], pa.binary()),
                "sample_rate": pa.array([sample_rate] * len(rows), pa.int32()),
                "num_samples": pa.array([r[3] for r in rows], pa.int64()),
            }
        )
        pq.write_table(table, out / f"part-{written // shard_size:05d}.parquet", row_group_size=64)
        written += len(rows)
        rows = []

    for path in files:
        wave = read_audio(path, sample_rate)
        rel = path.relative_to(root).with_suffix("").as_posix()
        rows.append((rel, rel.split("/")[0], encode_flac(wave, sample_rate), int(wave.size)))
        if len(rows) == shard_size:
            flush()
    flush()
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audio-root", type=Path, default=None, help="existing corpus (default: make one)")
    ap.add_argument("--num", type=int, default=1000, help="files to synthesise")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--input-rate", type=int, default=16000, help="sample rate of the synthetic files")
    ap.add_argument("--sample-rate", type=int, default=16000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs for a local cluster (default: all cores)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    from raysv.data.prepare import prepare_shards
    from raysv.runtime import RayConfig, ensure_ray

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=args.workdir))
    try:
        root = args.audio_root
        if root is None:
            root = work / "corpus"
            t = time.perf_counter()
            make_corpus(root, args.num, args.seconds, args.input_rate)
            print(f"made {args.num} files of {args.seconds:g} s at {args.input_rate} Hz in {time.perf_counter() - t:.1f} s")
        files = list_audio(root)
        print(f"corpus: {len(files)} files under {root}")

        t = time.perf_counter()
        n_base = single_process(files, root, work / "baseline", args.sample_rate, args.shard_size)
        base_s = time.perf_counter() - t
        base_fps = len(files) / base_s

        t = time.perf_counter()
        ensure_ray(RayConfig(num_cpus=args.num_cpus))
        cpus = int(ray.cluster_resources().get("CPU", 0))
        print(f"ray.init: {time.perf_counter() - t:.1f} s ({cpus} CPUs; not counted below)")

        runs: list[float] = []
        for name in ("shards_cold", "shards_warm"):
            t = time.perf_counter()
            report = prepare_shards(root, work / name, shard_size=args.shard_size, sample_rate=args.sample_rate,
                                    show_progress=False)
            runs.append(time.perf_counter() - t)
            assert report["num_utterances"] == n_base, (report["num_utterances"], n_base)
        cold_fps, warm_fps = (len(files) / s for s in runs)

        print(f"single process        : {base_fps:8.1f} files/s ({base_s:.1f} s, {n_base} rows)")
        print(f"prepare, cold workers : {cold_fps:8.1f} files/s ({runs[0]:.1f} s, includes Ray worker start-up)")
        print(f"prepare, warm workers : {warm_fps:8.1f} files/s ({runs[1]:.1f} s, {report['num_shards']} shards, "
              f"{cpus} Ray CPUs on {os.cpu_count()} cores)")
        print(f"ratio cold/single: {cold_fps / base_fps:.2f}")
        print("ratio warm/single (steady state, the figure for large corpora):")
        print(f"{warm_fps / base_fps:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
