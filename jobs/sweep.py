"""Job entry point: a Ray Tune sweep (clustering sizes, margins) on the running cluster.

    ray job submit --working-dir . -- python jobs/sweep.py --config configs/<sweep>.yaml --gpus 8 [key=value ...]
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import cluster, job_overrides, job_parser  # jobs/pipeline.py, beside this file


def main(argv: list[str] | None = None) -> None:
    args = job_parser("Run a raysv Ray Tune sweep on the Ray cluster this job was submitted to.").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from raysv.config import ConfigError
    from raysv.sweep import run_sweep

    if not Path(args.config).is_file():
        sys.exit(f"jobs/sweep.py: config file {args.config} does not exist")
    try:
        with cluster(args.gpus):
            run_sweep(args.config, job_overrides(args))
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"jobs/sweep.py: {err}")


if __name__ == "__main__":
    main()
