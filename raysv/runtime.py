"""Ray, started in one place: connecting or starting a cluster, GPUs, storage, task windows.

Entry points (the CLI, the pipeline, sweeps, jobs) call :func:`ensure_ray` once with the
run's ``ray`` section; library functions that need Ray call it too, and it does nothing
when Ray is already up. :func:`use_gpu` is the one answer to "train/embed/cluster on GPU?",
:func:`use_bf16` to "train under bf16 autocast?".
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from raysv.config import check_choice, check_positive


PRECISIONS = ("auto", "bf16", "fp32")
"""``ray.precision``: bf16 autocast in training where it pays (auto), always, or never."""


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX): bf16 autocast is faster
    there (1.5-1.6 × the demo's training steps on 2 cores) and much slower on CPUs that only emulate it."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def use_bf16(precision: str, device_type: str) -> bool:
    """Whether training on ``device_type`` ("cuda", "cpu", …) runs under bf16 autocast: auto takes
    it on GPUs and on CPUs with bf16 instructions, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16())


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
    # Training's forward passes (``use_bf16``): auto is bf16 autocast on GPUs and on CPUs with bf16
    # instructions (AVX512-BF16, AMX), fp32 elsewhere; bf16 | fp32 force one. Embeddings are fp32 on CPU.
    precision: str = "auto"

    def validate(self, prefix: str = "ray") -> None:
        check_choice(f"{prefix}.use_gpu", str(self.use_gpu).lower(), ("auto", "true", "false"))
        check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        check_positive(f"{prefix}.num_workers", self.num_workers)
        check_positive(f"{prefix}.cpus_per_worker", self.cpus_per_worker)


VERBOSE_ENV = "RAYSV_VERBOSE"
"""Set (``raysv -v`` sets it) to see Ray's own output: worker logs, progress bars, raylet warnings."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def local_system_config(num_cpus: int) -> dict[str, int]:
    """Ray settings for a local cluster that runs one stage after another.

    Worker processes may start as many at a time as there are logical CPUs (Ray's default, the
    cores, warns whenever a stage starts its actors and trainers on a small machine). Idle worker
    processes are kept up to three per logical CPU. Ray's default keeps one per logical CPU and
    kills the rest after a second; the evaluation's tasks (started by the driver) and the
    training's (started inside Ray Train, another runtime environment) then evict each other's,
    and every training stage waits about 10 s more for its first batch while its data workers
    start again (``benchmarks/bench_stage_start.py``).
    """
    cpus = max(num_cpus, os.cpu_count() or 1)
    return {"worker_maximum_startup_concurrency": cpus, "num_workers_soft_limit": 3 * cpus}


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
        # "Token authentication is enabled for this Ray cluster": a notice at every start, not a problem
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=loud)
    else:
        need = int(cfg.num_workers * cfg.cpus_per_worker) + (cfg.data_cpus or 2) + 1
        num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, need)
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=loud,
                 _system_config=local_system_config(num_cpus))
    quiet_data(loud)
    if not loud:
        divert_native_log_lines()


RAY_NOISE = re.compile(
    rb"^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] "  # a line of Ray's C++ core
    rb"|(\x1b\[\d+m)?\(raylet\)(\x1b\[0m)? WARNING: \d+ \w+ worker processes have been started)"
)
"""Lines Ray writes to a driver's stdout and stderr past Python's logging that say nothing about the run: its C++
core's notices (``[2026-01-01 12:00:00,123 E 4242 4242] file.cc:12: …``, an actor-pool restart caveat
on every run among them) and the raylet's count of worker processes started."""
_diverted: list[int] = []
_TERMINAL = {fd: os.isatty(fd) for fd in (1, 2)}  # before any diversion makes them pipes


def on_terminal(fd: int = 2) -> bool:
    """Whether the process's stdout (1) or stderr (2) was a terminal when it started: progress bars
    redraw in place there, and stay out of files and pipes."""
    return _TERMINAL.get(fd, False)


def divert_native_log_lines() -> None:
    """Keep :data:`RAY_NOISE` out of the console: to the ``raysv.native`` debug log (``run.log``).

    File descriptors 1 and 2 (the raylet's notices reach a driver through its stdout, the C++
    core's through stderr) each become a pipe read by a thread: those lines are logged,
    everything else passes through unchanged and at once (a line that might be one is held
    until its end, at most 4 kB). Undone at exit, after the last byte is through.
    """
    if _diverted:
        return
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        _divert(fd, stream)


def _divert(fd: int, stream: Any) -> None:
    stream.flush()
    original = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    _diverted.append(original)
    native = logging.getLogger("raysv.native")

    def pump() -> None:
        held, midline = b"", False  # held: a line start that may be noise; midline: passing a line through
        while chunk := os.read(read_end, 65536):
            data, out, held = held + chunk, [], b""
            while data:
                end = data.find(b"\n")
                line, data = (data, b"") if end < 0 else (data[:end + 1], data[end + 1:])
                if not midline and end >= 0 and RAY_NOISE.match(line):
                    native.debug(line.rstrip(b"\n").decode(errors="replace"))
                    continue
                if not midline and end < 0 and line[:1] in (b"[", b"\x1b", b"(") and len(line) < 4096:
                    held = line  # wait for the rest to tell
                    continue
                out.append(line)
                midline = end < 0
            if out:
                os.write(original, b"".join(out))
        if held:
            os.write(original, held)
        os.close(read_end)

    thread = threading.Thread(target=pump, name=f"raysv-native-fd{fd}", daemon=True)
    thread.start()

    def restore() -> None:
        for current in (stream, sys.stdout, sys.stderr):
            try:
                current.flush()
            except (ValueError, OSError, AttributeError):  # closed or replaced (pytest's capture, say)
                pass
        os.dup2(original, fd)  # the pipe's last writer closes: the pump drains it and ends
        thread.join(timeout=2.0)

    atexit.register(restore)


def quiet_data(loud: bool | None = None) -> None:
    """Ray Data's progress bars on a terminal only (redrawn as new lines in a log file they fill it)."""
    import ray.data

    loud = verbose() if loud is None else loud
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = loud or on_terminal()
    ctx.print_on_execution_start = loud
    if not loud:
        logging.getLogger("ray.data").setLevel(logging.ERROR)


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
