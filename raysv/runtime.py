"""Ray, started in one place: connecting or starting a cluster, GPUs, storage, task windows.

Entry points (the CLI, the pipeline, sweeps, jobs) call :func:`ensure_ray` once with the
run's ``ray`` section; library functions that need Ray call it too, and it does nothing
when Ray is already up. :func:`use_gpu` is the one answer to "train/embed/cluster on GPU?".
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from raysv.config import check_choice, check_positive


@dataclass
class RayConfig:
    """``ray``: where to run and with what resources."""

    address: str | None = None
    num_workers: int = 2
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    data_cpus: int | None = 2  # logical CPUs Ray Data may use while the trainers run (null: no limit)
    storage: str | None = None  # Ray Train storage; default <runs>/<name>/ray
    max_failures: int = 0
    num_cpus: int | None = None  # logical CPUs of a local cluster started by raysv

    def validate(self, prefix: str = "ray") -> None:
        check_choice(f"{prefix}.use_gpu", str(self.use_gpu).lower(), ("auto", "true", "false"))
        check_positive(f"{prefix}.num_workers", self.num_workers)
        check_positive(f"{prefix}.cpus_per_worker", self.cpus_per_worker)


VERBOSE_ENV = "RAYSV_VERBOSE"
"""Set (``raysv -v`` sets it) to see Ray's own output: worker logs, progress bars, raylet warnings."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Connect to ``ray.address`` (or RAY_ADDRESS), else start a local cluster sized for the run.

    The only place raysv calls ``ray.init``; a no-op when this process is already connected.
    Unless :func:`verbose`, the workers' and raylets' output stays in Ray's log files (what
    raysv has to say comes from the driver) and Ray Data draws progress bars only on a terminal.
    """
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    loud = verbose()
    if not loud:
        logging.getLogger("ray").setLevel(logging.WARNING)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=loud)
    else:
        need = int(cfg.num_workers * cfg.cpus_per_worker) + (cfg.data_cpus or 2) + 1
        num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, need)
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=loud)
    quiet_data(loud)


def quiet_data(loud: bool | None = None) -> None:
    """Ray Data's progress bars on a terminal only (redrawn as new lines in a log file they fill it)."""
    import ray.data

    loud = verbose() if loud is None else loud
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = loud or sys.stderr.isatty()
    ctx.print_on_execution_start = loud


def cluster_gpus() -> int:
    """GPUs of the connected Ray cluster (0 when Ray is not started)."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0


def use_gpu(setting: str | bool | None = "auto") -> bool:
    """``ray.use_gpu``: true/false, or auto (also None) = whenever the cluster has GPUs.

    ``true`` on a cluster without GPUs is an error rather than a silent CPU run.
    """
    value = "auto" if setting is None else str(setting).lower()
    if value == "false":
        return False
    gpus = cluster_gpus()
    if value == "true" and gpus == 0:
        raise RuntimeError("ray.use_gpu is true but the Ray cluster reports no GPU; set ray.use_gpu=auto or false")
    return gpus > 0


def torch_device(gpu: bool) -> Any:
    """The torch device of this process for ``gpu`` (checked: a GPU actor must see CUDA)."""
    import torch

    if not gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("a GPU was asked for but CUDA is not available in this process")
    return torch.device("cuda")


def storage_path(cfg: RayConfig, run_dir: Path) -> str:
    """Ray Train storage: ``ray.storage`` (local path or URI) or ``<run_dir>/ray``."""
    if cfg.storage:
        return cfg.storage if "://" in cfg.storage else str(Path(cfg.storage).resolve())
    return str((Path(run_dir) / "ray").resolve())


def task_window() -> int:
    """How many Ray tasks to keep in flight: twice the cluster's CPUs, at least 4."""
    import ray

    return max(4, int(2 * ray.cluster_resources().get("CPU", 1.0)))


def run_windowed(
    jobs: Iterator[tuple[int, Callable[[], Any], int]],
    window: int,
    on_done: Callable[[int, Any, int], None],
) -> None:
    """Keep at most ``window`` tasks in flight; call ``on_done(key, result, weight)`` as each ends.

    ``jobs`` yields ``(key, submit, weight)`` where ``submit()`` starts a task and returns its
    ref; on any error (or Ctrl-C) the tasks still running are cancelled.
    """
    import ray

    inflight: dict[Any, tuple[int, int]] = {}

    def fill() -> None:
        while len(inflight) < window:
            job = next(jobs, None)
            if job is None:
                return
            key, submit, weight = job
            inflight[submit()] = (key, weight)

    try:
        fill()
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                key, weight = inflight.pop(ref)
                on_done(key, ray.get(ref), weight)
            fill()
    except BaseException:
        for ref in inflight:
            ray.cancel(ref)
        raise
