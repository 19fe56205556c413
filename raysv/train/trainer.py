"""Driver side of training: the ``TorchTrainer`` of a stage, and its final model.

The driver builds the dataset and the trainer, nothing else (Ray's pattern); the
workers run :func:`raysv.train.loop.train_loop_per_worker` with the method's name,
its config section and the run settings below.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raysv.artifacts.checkpoint import CHECKPOINT_FILES
from raysv.artifacts.jsonio import write_json
from raysv.config import ConfigError, differences, to_dict
from raysv.runtime import RayConfig, use_gpu

log = logging.getLogger("raysv.train")


@dataclass
class CheckpointConfig:
    """``checkpoint``: how many epoch checkpoints Ray Train keeps per training run."""

    num_to_keep: int | None = 2


@dataclass
class TrainingConfig:
    """``train``: limits shared by every training stage."""

    max_steps_per_epoch: int | None = None  # cap each epoch's steps (rehearsals, smoke runs); null: the whole epoch


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
    max_steps_per_epoch: int | None = None
    progress_file: str | None = None  # rank 0 appends a line per epoch; the driver prints them as they come


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
    fingerprint: dict[str, Any] | None = None,
    fingerprint_default: dict[str, Any] | None = None,
) -> Path:
    """Train ``method`` (configured by ``section``) on ``dataset`` with Ray Train; copy the last checkpoint to ``out``.

    Re-running with the same storage and ``run_name`` resumes from the last epoch
    checkpoint (Train V2 restores the run by name); finished runs return at once. With a
    ``fingerprint`` (the settings the run's result depends on), resuming a run made with
    other settings is refused, naming the keys that differ (``fingerprint_default``, the same
    settings from raysv's default config, lets a run recorded before a setting existed continue).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysv.train.loop import train_loop_per_worker

    check_resumable(settings, fingerprint, fingerprint_default)
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
    with ProgressPrinter(settings.progress_file):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {settings.run_name} ended without a checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        for name in CHECKPOINT_FILES:
            shutil.copyfile(Path(folder) / name, out / name)
    return out


def check_resumable(settings: TrainSettings, fingerprint: dict[str, Any] | None,
                    default: dict[str, Any] | None = None) -> None:
    """Refuse to resume a training run of other settings; say so when resuming one of the same.

    A key the record lacks whose value is its ``default`` is no change (a setting added to
    raysv after the run started, left as it was). The settings are kept as ``raysv_run.json`` in the run's storage folder (local storage only:
    on object stores the check is skipped).
    """
    if fingerprint is None or "://" in settings.storage:
        return
    folder = Path(settings.storage) / settings.run_name
    record = folder / "raysv_run.json"
    plain = json.loads(json.dumps(fingerprint, default=str))
    if record.is_file():
        changes = differences(json.loads(record.read_text()), plain,
                              json.loads(json.dumps(default, default=str)) if default else None)
        if changes:
            raise ConfigError(
                f"training run {settings.run_name} in {settings.storage} was made with other settings:\n  "
                + "\n  ".join(changes) + "\nchoose another output folder, or delete that run to start it afresh")
        if any(folder.glob("checkpoint_*")):
            log.info("resuming training run %s from its last checkpoint", settings.run_name)
        return
    if folder.is_dir() and any(folder.glob("checkpoint_*")):
        raise ConfigError(f"{folder} holds a training run made without a settings record; delete it or choose "
                          "another output folder")
    write_json(record, plain)


class ProgressPrinter:
    """While training runs, log each line rank 0 appends to ``path`` (one per epoch)."""

    def __init__(self, path: str | None, interval: float = 1.0):
        self.path = Path(path) if path else None
        self.interval = interval
        self._stop = threading.Event()
        self._offset = 0
        self._thread: threading.Thread | None = None

    def _drain(self) -> None:
        try:
            with self.path.open() as f:  # type: ignore[union-attr]
                f.seek(self._offset)
                text = f.read()
        except OSError:
            return
        done, _, _ = text.rpartition("\n")
        if done:
            self._offset += len(done) + 1
            for line in done.splitlines():
                log.info("  %s", line)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._drain()

    def __enter__(self) -> "ProgressPrinter":
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._offset = self.path.stat().st_size if self.path.is_file() else 0
            self._thread = threading.Thread(target=self._run, name="raysv-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2 * self.interval)
            self._drain()
