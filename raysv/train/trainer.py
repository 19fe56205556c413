"""Driver side of training: Ray start-up, the ``TorchTrainer`` of a stage, and its final model."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from raysv.config import Config
from raysv.train.checkpoint import MODEL_FILE, SPEC_FILE, TRAINING_FILE

log = logging.getLogger("raysv.train")


def ensure_ray(cfg: Config) -> None:
    """Connect to ``ray.address`` (or RAY_ADDRESS), else start a local cluster sized for the run."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False)
        return
    need = int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + (cfg.ray.data_cpus or 2) + 1
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, need)
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=True)


def use_gpu(cfg: Config) -> bool:
    """``ray.use_gpu``: true/false, or auto = whenever the cluster has GPUs."""
    setting = str(cfg.ray.use_gpu).lower()
    if setting in ("true", "false"):
        return setting == "true"
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def storage_path(cfg: Config) -> str:
    """Ray Train storage: ``ray.storage`` (local path or URI) or ``<runs>/<name>/ray``."""
    if cfg.ray.storage:
        return cfg.ray.storage if "://" in cfg.ray.storage else str(Path(cfg.ray.storage).resolve())
    return str((cfg.run_dir / "ray").resolve())


def _data_config(cfg: Config) -> Any:
    """Ray Train's ingest options, with Ray Data held to ``ray.data_cpus`` logical CPUs.

    Unbounded, the crop tasks take every free logical CPU and, where logical CPUs
    outnumber cores, preempt the training threads they are feeding.
    """
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    if cfg.ray.data_cpus:
        options.resource_limits = options.resource_limits.copy(cpu=float(cfg.ray.data_cpus))
    return ray.train.DataConfig(execution_options=options)


def fit(
    cfg: Config,
    method: str,
    dataset: Any,
    out: str | Path,
    *,
    run_name: str,
    method_args: dict[str, Any] | None = None,
    mlflow: dict[str, Any] | None = None,
    fault: dict[str, Any] | None = None,
    record_dir: str | None = None,
    dev_eval: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Path:
    """Train ``method`` on ``dataset`` with Ray Train and copy the last checkpoint to ``out``.

    Re-running with the same storage and ``run_name`` resumes from the last epoch
    checkpoint (Train V2 restores the run by name); finished runs return at once.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysv.train.loop import train_loop_per_worker

    gpu = use_gpu(cfg)
    resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "method": method,
            "method_args": method_args or {},
            "mlflow": mlflow,
            "fault": fault,
            "record_dir": record_dir,
            "dev_eval": dev_eval,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
        dataset_config=_data_config(cfg),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        for name in (MODEL_FILE, TRAINING_FILE, SPEC_FILE):
            shutil.copyfile(Path(folder) / name, out / name)
    return out
