"""Driver side of training: the ``TorchTrainer`` of a stage, and its final model.

The driver builds the dataset and the trainer, nothing else (Ray's pattern); the
workers run :func:`raysv.train.loop.train_loop_per_worker` with the method's name,
its config section and the run settings below.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raysv.artifacts.checkpoint import CHECKPOINT_FILES
from raysv.config import to_dict
from raysv.runtime import RayConfig, use_gpu

log = logging.getLogger("raysv.train")


@dataclass
class CheckpointConfig:
    """``checkpoint``: how many epoch checkpoints Ray Train keeps per training run."""

    num_to_keep: int | None = 2


@dataclass
class TrainSettings:
    """What a training run needs besides its method: where it stores, what it runs on, how it reads."""

    run_name: str
    storage: str
    ray: RayConfig
    seed: int = 0
    shuffle_buffer: int = 256
    prefetch_batches: int = 4
    num_to_keep: int | None = 2


def _data_config(cfg: RayConfig) -> Any:
    """Ray Train's ingest options, with Ray Data held to ``ray.data_cpus`` logical CPUs.

    Unbounded, the crop tasks take every free logical CPU and, where logical CPUs
    outnumber cores, preempt the training threads they are feeding.
    """
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    if cfg.data_cpus:
        options.resource_limits = options.resource_limits.copy(cpu=float(cfg.data_cpus))
    return ray.train.DataConfig(execution_options=options)


def fit(
    method: str,
    section: Any,
    dataset: Any,
    out: str | Path,
    settings: TrainSettings,
    *,
    method_args: dict[str, Any] | None = None,
    mlflow: dict[str, Any] | None = None,
    fault: dict[str, Any] | None = None,
    record_dir: str | None = None,
    dev_eval: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
) -> Path:
    """Train ``method`` (configured by ``section``) on ``dataset`` with Ray Train; copy the last checkpoint to ``out``.

    Re-running with the same storage and ``run_name`` resumes from the last epoch
    checkpoint (Train V2 restores the run by name); finished runs return at once.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysv.train.loop import train_loop_per_worker

    ray_cfg = settings.ray
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "method": method,
            "section": to_dict(section),
            "method_args": method_args or {},
            "settings": {**asdict(settings), "ray": asdict(ray_cfg)},
            "mlflow": mlflow,
            "fault": fault,
            "record_dir": record_dir,
            "dev_eval": dev_eval,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=ray_cfg.num_workers, use_gpu=use_gpu(ray_cfg.use_gpu),
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=settings.run_name,
            storage_path=settings.storage,
            failure_config=ray.train.FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.num_to_keep),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
        dataset_config=_data_config(ray_cfg),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {settings.run_name} ended without a checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        for name in CHECKPOINT_FILES:
            shutil.copyfile(Path(folder) / name, out / name)
    return out
