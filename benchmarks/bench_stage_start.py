"""A training stage's wait for its first batch, after an evaluation stage, with and without raysv's worker settings.

A run alternates Ray Train stages (whose Ray Data tasks run in Train's runtime environment)
with evaluation and extraction stages (Ray Data started by the driver). By default a local
Ray cluster keeps one idle worker process per logical CPU and kills the others, so the two
kinds of stage evict each other's data workers and every training stage starts them again.
Each setting gets a fresh local cluster (a subprocess) that runs: a Train stage, a driver-side
pass over the data (as an evaluation does), a second Train stage. Printed: the second stage's
first-batch wait with Ray's default and with :func:`raysv.runtime.local_system_config`, and
their ratio (last line).

    python benchmarks/bench_stage_start.py --shards runs/demo-data/train_shards
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _first_batch_wait(config: dict) -> dict:
    """In the Train worker: seconds to the first batch of each epoch, and the data workers' pids."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    waits, epochs, pids = [], [], set()
    for _ in range(config["epochs"]):
        start, wait = time.perf_counter(), None
        for batch in shard.iter_batches(batch_size=32, batch_format="numpy"):
            wait = time.perf_counter() - start if wait is None else wait
            pids.update(int(p) for p in batch["pid"])
        waits.append(wait)
        epochs.append(time.perf_counter() - start)
    with open(config["out"], "w") as f:
        json.dump({"waits": waits, "epochs": epochs, "pids": sorted(pids)}, f)
    return {}


def one_setting(shards: str, raysv_settings: bool, storage: str) -> dict:
    """Train stage, driver-side pass, Train stage, in one fresh local cluster."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysv.artifacts.shards import shard_utt_index
    from raysv.data.pipelines import DataConfig, label_table, supervised_dataset
    from raysv.runtime import RayConfig, local_system_config
    from raysv.train.trainer import _data_config

    num_cpus = 8
    system = local_system_config(num_cpus) if raysv_settings else {"worker_maximum_startup_concurrency": num_cpus}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _system_config=system)
    data = DataConfig(shards=shards, mix_row_groups=32)
    utts = shard_utt_index(shards)
    table = label_table(utts, utts % 40)

    def stage(name: str) -> dict:
        out = os.path.join(storage, f"{name}.json")
        TorchTrainer(
            _first_batch_wait, train_loop_config={"epochs": 3, "out": out},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
            run_config=ray.train.RunConfig(name=name, storage_path=storage),
            datasets={"train": supervised_dataset(data, table, 2.0, False)},
            dataset_config=_data_config(RayConfig(data_cpus=2)),  # as raysv's training stages
        ).fit()
        with open(out) as f:
            return json.load(f)

    first = stage("first")
    for _ in supervised_dataset(data, table, 2.0, False).iter_batches(batch_size=32):
        pass  # an evaluation's Ray Data, started by the driver
    time.sleep(3)  # Ray kills surplus idle workers after a second
    second = stage("second")
    ray.shutdown()
    return {"first": first["waits"], "second": second["waits"], "epochs": first["epochs"] + second["epochs"],
            "reused": len(set(first["pids"]) & set(second["pids"])), "data_workers": len(second["pids"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="runs/demo-data/train_shards")
    parser.add_argument("--storage", default="/tmp/raysv-bench-stage-start")
    parser.add_argument("--one", choices=["default", "raysv"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = one_setting(os.path.abspath(args.shards), args.one == "raysv",
                             os.path.join(args.storage, args.one))
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for setting in ("default", "raysv"):
        proc = subprocess.run([sys.executable, __file__, "--shards", args.shards, "--storage",
                               os.path.join(args.storage, str(time.time_ns())), "--one", setting],
                              capture_output=True, text=True, check=True)
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        results[setting] = json.loads(line[len("RESULT "):])
    for setting, r in results.items():
        print(f"{setting:8s}: second stage waits {r['second'][0]:.1f} s for its first batch (later epochs "
              f"{r['second'][1]:.1f} s; first stage {r['first'][0]:.1f} s); {r['reused']} of "
              f"{r['data_workers']} data workers reused; epochs of the data alone "
              + ", ".join(f"{e:.1f}" for e in r["epochs"]) + " s")
    print(f"{results['default']['second'][0] / results['raysv']['second'][0]:.2f}")


if __name__ == "__main__":
    main()
