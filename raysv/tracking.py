"""MLflow: one parent run per pipeline run, one nested child run per stage.

Only the driver and rank 0 write (sqlite takes one writer at a time). The default
store is ``sqlite:///<runs>/mlflow.db`` with artifacts beside it; the environment
variable ``MLFLOW_TRACKING_URI`` (set on a cluster) wins over the config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("raysv.tracking")
logging.getLogger("alembic").setLevel(logging.WARNING)


@dataclass
class MlflowConfig:
    """``mlflow``: where runs are recorded."""

    tracking_uri: str | None = None  # default sqlite:///<runs>/mlflow.db; MLFLOW_TRACKING_URI wins
    experiment: str = "raysv"


def tracking_uri(cfg: MlflowConfig, runs: str | Path) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.tracking_uri:
        return cfg.tracking_uri
    runs = Path(runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(data, dict):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: str(data)[:500]}


class Tracker:
    """Creates and finds runs by tag so a resumed pipeline logs into the same parent run."""

    def __init__(self, cfg: MlflowConfig, runs: str | Path):
        self.uri = tracking_uri(cfg, runs)
        self.client = _client(self.uri)
        self.experiment_id = self._experiment(cfg.experiment)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            return self.client.get_experiment_by_name(name).experiment_id

    def find_run(self, tags: dict[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None, params: Any = None) -> str:
        """The run with these tags if it exists (resume), else a new one."""
        existing = self.find_run(tags)
        if existing is not None:
            self.client.update_run(existing, status="RUNNING")
            return existing
        all_tags = dict(tags)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if params is not None:
            flat = _flatten(params)
            items = list(flat.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 100):
                self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


class StageLogger:
    """Rank 0's handle on its stage's MLflow run: metrics only, by run id."""

    def __init__(self, uri: str, run_id: str):
        self.client = _client(uri)
        self.run_id = run_id

    @classmethod
    def from_config(cls, info: dict[str, Any] | None) -> "StageLogger | None":
        if not info or not info.get("run_id"):
            return None
        return cls(info["tracking_uri"], info["run_id"])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        except Exception as err:  # tracking must never kill training
            log.warning("MLflow logging failed: %s", err)
