"""DINO crop batches per second: the Ray Data pipeline against a plain single-process loop.

Both read the same shards and do the same work per utterance (decode FLAC, draw the
global and local crops, augment each crop). The last line is the speed-up ratio.

    python benchmarks/bench_pipeline.py --shards runs/demo-data/train_shards
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def plain_loop(shards: Path, cfg, batch: int) -> tuple[int, float]:
    """Decode, crop and augment in this process, row group by row group."""
    from raysv.data.pipelines import augment_params, multi_crop_batch
    from raysv.methods.dino import dino_views

    views = dino_views(cfg.dino.crops)
    aug = augment_params(cfg.data.augment)
    start = time.perf_counter()
    batches = 0
    pending: dict[str, list] = {"utt_index": [], "audio": []}
    for part in sorted(shards.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["utt_index", "audio"])
        pending["utt_index"] += table.column("utt_index").to_pylist()
        pending["audio"] += table.column("audio").to_pylist()
        while len(pending["utt_index"]) >= batch:
            rows = {k: np.asarray(v[:batch], dtype=object) for k, v in pending.items()}
            pending = {k: v[batch:] for k, v in pending.items()}
            multi_crop_batch(rows, views, aug)
            batches += 1
    return batches, time.perf_counter() - start


def ray_pipeline(shards: Path, cfg, batch: int) -> tuple[int, float]:
    """The training pipeline: Ray Data map_batches tasks feeding an iterator, as a worker sees it."""
    from raysv.data.pipelines import multi_crop_dataset
    from raysv.methods.dino import dino_views

    data = dataclasses.replace(cfg.data, shards=str(shards))
    ds = multi_crop_dataset(data, dino_views(cfg.dino.crops))
    start = time.perf_counter()
    batches = sum(1 for _ in ds.iter_torch_batches(batch_size=batch, drop_last=True))
    return batches, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="runs/demo-data/train_shards")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()

    import ray

    from raysv.run_config import load_config
    from raysv.runtime import RayConfig, ensure_ray

    cfg = load_config(args.config)
    shards = Path(args.shards)
    ensure_ray(RayConfig(num_cpus=args.num_cpus or os.cpu_count()))
    ray_pipeline(shards, cfg, args.batch)  # warm-up: worker processes start once
    n_ray, t_ray = ray_pipeline(shards, cfg, args.batch)
    n_plain, t_plain = plain_loop(shards, cfg, args.batch)
    ray.shutdown()
    plain_rate, ray_rate = n_plain / t_plain, n_ray / t_ray
    print(f"plain loop: {n_plain} batches in {t_plain:.1f} s = {plain_rate:.2f} batches/s")
    print(f"ray data  : {n_ray} batches in {t_ray:.1f} s = {ray_rate:.2f} batches/s")
    print(f"{ray_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
