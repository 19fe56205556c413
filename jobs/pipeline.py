"""Job entry point: the whole method on the running cluster; re-submit to resume.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/voxceleb2.yaml --gpus 8 [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time

log = logging.getLogger("raysv.job")


def job_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every job entry point takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/voxceleb2.yaml")
    p.add_argument("--storage", metavar="ROOT", help="output root shared by every node: runs=ROOT/runs, "
                   "ray.storage=ROOT/ray; an s3:// ROOT sets ray.storage only (the run directory needs a file system)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs to ask the autoscaler for and hold until the job ends")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. rounds.count=2")
    return p


def job_overrides(args: argparse.Namespace) -> list[str]:
    """``--storage`` as config overrides, followed by the explicit ones (which win)."""
    root = (args.storage or "").rstrip("/")
    storage = []
    if root:
        storage = [f"ray.storage={root}/ray"] if "://" in root else [f"runs={root}/runs", f"ray.storage={root}/ray"]
    return storage + list(args.overrides)


@contextlib.contextmanager
def cluster(gpus: int, timeout_s: float = 3600.0):
    """Attach to the running cluster (never start one); with ``gpus`` > 0, scale up to them and keep them."""
    import ray
    from ray.autoscaler.sdk import request_resources

    from raysv.runtime import RayConfig, ensure_ray

    ensure_ray(RayConfig(address="auto"))
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `ray job stop` still releases the GPUs
    try:
        if gpus > 0:
            request_resources(bundles=[{"GPU": 1}] * gpus)
            start = time.monotonic()
            while (have := ray.cluster_resources().get("GPU", 0)) < gpus:
                if time.monotonic() - start > timeout_s:
                    raise SystemExit(f"only {have:g} of {gpus} GPUs after {timeout_s / 60:.0f} min; see `ray status`")
                log.info("waiting for the autoscaler: %g of %d GPUs", have, gpus)
                time.sleep(30)
        yield ray
    finally:
        if gpus > 0:
            request_resources(bundles=[])
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    p = job_parser("Run (or continue) the raysv pipeline on the Ray cluster this job was submitted to.")
    p.add_argument("--until", help="stop after this stage (e.g. round_0/dino, round_1/cluster)")
    p.add_argument("--merge", action="append", default=[], metavar="FILE",
                   help="YAML merged after --config, before key=value (e.g. a sweep's best.yaml)")
    p.add_argument("--restart-from", help="re-run this stage and everything after it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from raysv.config import ConfigError
    from raysv.pipeline import ConfigChanged, plan, run_pipeline
    from raysv.run_config import load_config

    try:
        cfg = load_config(args.config, job_overrides(args), merge=args.merge)
        ids = [s.id for s in plan(cfg)]
        for flag, stage in (("--until", args.until), ("--restart-from", args.restart_from)):
            if stage is not None and stage not in ids:
                raise ConfigError(f"{flag} {stage!r}: no such stage; stages are {', '.join(ids)}")
        with cluster(args.gpus):
            run_pipeline(cfg, until=args.until, restart_from=args.restart_from)
    except (ConfigError, ConfigChanged, FileNotFoundError) as err:
        sys.exit(f"jobs/pipeline.py: {err}")


if __name__ == "__main__":
    main()
