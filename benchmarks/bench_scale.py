"""The per-epoch work that grows with the number of utterances, at VoxCeleb2 dev's 1,092,009 rows, without audio.

Writes shards of tiny placeholder audio (realistic ``utt_id`` strings, 1,000 rows per shard,
row groups of 64), a manifest and a pseudo-label file of 7,500 classes, then times what a
fine-tuning epoch does with them besides training: listing the row groups, streaming every
row through Ray Data with the labels joined by ``utt_index`` (the dataset the trainers read,
with the audio column left as it is), the per-class selection (at most 500 per class), the
class-unique batching of one worker's rows, and the loss-gate mixture fit on a million losses.
Prints seconds and peak memory of each step; the last line is the per-epoch total in seconds.

    python benchmarks/bench_scale.py [--rows 1092009] [--workers 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_fake_shards(out: Path, rows: int, speakers: int = 5994, shard_size: int = 1000) -> None:
    """Shards and manifest with the real schema; the audio of every row is the same 44-byte stub."""
    from raysv.artifacts.shards import ROW_GROUP_SIZE, shard_schema

    rng = np.random.default_rng(0)
    spk = np.sort(rng.integers(0, speakers, rows))
    out.mkdir(parents=True, exist_ok=True)
    stub = b"RIFF" + b"\0" * 40
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"))
    manifests = []
    for part, start in enumerate(range(0, rows, shard_size)):
        idx = np.arange(start, min(start + shard_size, rows))
        videos = ["".join(v) for v in alphabet[rng.integers(0, len(alphabet), (len(idx), 11))]]
        utt_ids = [f"id{10000 + s:05d}/{v}/{i % 200 + 1:05d}" for s, v, i in zip(spk[idx], videos, idx)]
        table = pa.Table.from_arrays(
            [pa.array(idx, pa.int64()), pa.array(utt_ids, pa.string()), pa.array([f"id{10000 + s:05d}" for s in spk[idx]]),
             pa.array([stub] * len(idx), pa.binary()), pa.array(np.full(len(idx), 16000, np.int32)),
             pa.array(np.full(len(idx), 128000, np.int64))],
            schema=shard_schema(),
        )
        pq.write_table(table, out / f"part-{part:05d}.parquet", row_group_size=ROW_GROUP_SIZE)
        manifests.append(table.drop_columns(["audio"]))
    pq.write_table(pa.concat_tables(manifests), out / "manifest.parquet")
    (out / "report.json").write_text("{}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_092_009)
    parser.add_argument("--classes", type=int, default=7500)
    parser.add_argument("--workers", type=int, default=8, help="Ray Train workers the rows are shared by")
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args()

    from raysv.artifacts.labels import read_labels, write_labels
    from raysv.artifacts.shards import shard_row_groups
    from raysv.data.pipelines import label_table, stream_shards
    from raysv.data.sampling import UniqueClassBatches, epoch_selection
    from raysv.methods.noisy_labels import gate_space, gmm_crossing
    from raysv.runtime import RayConfig, ensure_ray

    rows = args.rows
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        shards = Path(tmp) / "shards"
        t = time.perf_counter()
        write_fake_shards(shards, rows)
        rng = np.random.default_rng(1)
        write_labels(Path(tmp) / "labels", np.arange(rows), rng.integers(0, args.classes, rows).astype(np.int32))
        print(f"wrote {rows:,} rows in {len(list(shards.glob('part-*')))} shards and 7,500-class labels "
              f"in {time.perf_counter() - t:.1f} s (not counted)")
        steps: dict[str, float] = {}

        def timed(name: str, fn):
            started = time.perf_counter()
            result = fn()
            steps[name] = time.perf_counter() - started
            print(f"{name:<44} {steps[name]:7.2f} s   peak RSS {_peak_mb():8.0f} MB")
            return result

        utt, labels = timed("read the labels", lambda: read_labels(Path(tmp) / "labels"))
        table = timed("dense label table", lambda: label_table(utt, labels))
        groups = timed("list the row groups (footers)", lambda: shard_row_groups(shards))
        print(f"  {len(groups):,} row groups")
        ensure_ray(RayConfig(num_cpus=args.num_cpus or os.cpu_count()))
        import ray

        ref = ray.put(table)

        def stream():
            ds = stream_shards(shards, columns=["utt_index", "audio"], mix_row_groups=32, block_rows=512)
            ds = ds.map_batches(_join_labels, fn_kwargs={"ref": ref}, batch_size=512, batch_format="numpy")
            count = 0
            for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
                count += len(batch["utt_index"])
            return count

        seen = timed("stream every row through Ray Data, labels joined", stream)
        assert seen == rows, (seen, rows)
        selected = timed("per-class selection (<= 500 per class)", lambda: epoch_selection(labels, 500, 0, 3))
        share = np.flatnonzero(selected)[:: args.workers]  # one worker's rows

        def batches():
            stream_rows = ({"utt_index": share[i:i + 16]} for i in range(0, len(share), 16))
            return sum(1 for _ in UniqueClassBatches(30)(stream_rows, lambda b: labels[b["utt_index"]]))

        timed(f"class-unique batches of one worker's rows (1/{args.workers})", batches)
        losses = np.exp(rng.normal(0, 1, rows)).astype(np.float32)
        timed("loss-gate mixture fit on every row's log-loss", lambda: gmm_crossing(gate_space(losses, "log")))
    total = sum(v for k, v in steps.items() if k != "read the labels")
    print(f"per-epoch overhead: {total:.1f} s at {rows:,} rows, peak RSS {_peak_mb():.0f} MB")
    print(f"{total:.1f}")


def _join_labels(batch, ref):
    import ray

    idx = np.asarray(batch["utt_index"], dtype=np.int64)
    return {"utt_index": idx, "label": ray.get(ref)[idx]}


if __name__ == "__main__":
    main()
