"""The one training loop every method runs in, on Ray Train workers.

``train_loop_per_worker`` is a plain function of a config dict (Ray's pattern):
it builds the method, resumes from ``ray.train.get_checkpoint()`` when Ray Train
restarts the workers or the run is re-launched, iterates its shard of the
streaming dataset, and reports metrics plus a full checkpoint every epoch.
``run_epochs`` holds the epoch logic without Ray so tests can drive it in-process.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from raysv.artifacts.checkpoint import TRAINING_FILE, load_training_state, save_model, save_training_state
from raysv.methods import build_method
from raysv.methods.base import Method
from raysv.runtime import use_bf16

log = logging.getLogger("raysv.train")

ROWS_PER_READ = 16
"""Rows per batch a method that forms its own batches (``custom_batches``) reads from its shard."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and numbers (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])


def _all_have(has: bool) -> bool:
    """Whether every worker of the process group has a batch for the next step (True alone)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return has
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if has else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def agreed_batches(batches: Iterable[Any], limit: int | None = None) -> Iterator[Any]:
    """The batches while every worker still has one: DDP needs the same number of steps everywhere.

    A worker whose stream runs longer (its share of an epoch's selection was larger, or
    its last rows made no batch elsewhere) drains the rest untrained, so the next epoch's
    stream starts clean. ``limit`` caps the steps of the epoch (``train.max_steps_per_epoch``)
    the same way on every worker.
    """
    iterator = iter(batches)
    steps = 0
    for batch in iterator:
        if limit is not None and steps >= limit:
            for _ in iterator:
                pass
            return
        if not _all_have(True):
            for _ in iterator:
                pass
            return
        steps += 1
        yield batch
    _all_have(False)


def run_epochs(
    method: Method,
    batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
    start_epoch: int,
    on_epoch_end: Callable[[int, dict[str, Any], np.ndarray], None],
    before_epoch: Callable[[int], None] | None = None,
    max_steps: int | None = None,
) -> None:
    """Epochs ``start_epoch`` .. ``method.epochs - 1``: steps, averaged metrics, a callback per epoch.

    The callback also receives the ``utt_index`` of every row this worker trained on.
    """
    for epoch in range(start_epoch, method.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        started = time.time()
        metrics = dict(method.start_epoch(epoch))
        sums: dict[str, float] = {}
        steps = 0
        crops = 0
        pids: set[int] = set()
        seen: list[torch.Tensor] = []
        waited = 0.0  # time blocked on the input pipeline: high means data-bound, not model-bound
        iterator = agreed_batches(batches(epoch), max_steps)
        while True:
            asked = time.time()
            batch = next(iterator, None)
            waited += time.time() - asked
            if batch is None:
                break
            if "pid" in batch:
                pids.update(int(p) for p in torch.unique(batch.pop("pid")).tolist())
            if "utt_index" in batch:
                seen.append(batch["utt_index"].detach().cpu())
            stats = method.train_step(batch)
            crops += int(stats.pop("crops", 0))
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            steps += 1
        if steps == 0:
            raise RuntimeError(
                f"epoch {epoch}: this worker received no full batch; lower the batch size "
                f"({method.batch_size}) or the number of workers, or add data"
            )
        seconds = time.time() - started
        metrics.update({key: value / steps for key, value in sums.items()})
        metrics.update(method.end_epoch(epoch))
        metrics.update({"epoch": epoch, "steps": steps, "epoch_seconds": seconds, "crops_per_s": crops / seconds,
                        "data_wait_s": waited, "torch_threads": torch.get_num_threads()})
        metrics["data_pids"] = ",".join(map(str, sorted(pids)))
        metrics["rows"] = int(sum(t.numel() for t in seen))
        # Peak resident memory of this worker process so far (Linux reports KiB).
        metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        on_epoch_end(epoch, metrics, torch.cat(seen).numpy() if seen else np.zeros(0, np.int64))


def dev_eer(encoder: torch.nn.Module, dev: dict[str, Any], device: torch.device) -> float:
    """EER of the current encoder on a (small) dev trial list, whole utterances, cosine scoring.

    Runs on rank 0 after each epoch when a sweep asks for it, so schedulers such as
    ASHA can stop poor trials early.
    """
    from raysv.audio.io import read_audio
    from raysv.data.trials import read_trials, resolve_trial_audio
    from raysv.embedding.core import utterance_embedding
    from raysv.evaluation.metrics import compute_eer
    from raysv.evaluation.scoring import score_trials

    trials = read_trials(dev["path"])
    files = resolve_trial_audio(trials, dev["audio_root"])
    was_training = encoder.training
    encoder.eval()
    try:
        embeddings = {
            utt: utterance_embedding(encoder, read_audio(path), dev.get("max_seconds", 30.0), device)
            for utt, path in files.items()
        }
    finally:
        encoder.train(was_training)
    return compute_eer(score_trials(embeddings, trials.enroll, trials.test), trials.labels)


def _fault_hook(fault: dict[str, Any] | None, epoch: int, rank: int) -> None:
    """Test-only: kill this worker process once, at the start of ``fault['epoch']``.

    It waits a few health-check intervals first, so that Ray Train's controller has
    registered the previous epoch's checkpoint: a crash loses at most the epoch in flight.
    """
    if not fault or rank != 0 or epoch != fault["epoch"]:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    time.sleep(float(fault.get("delay_s", 6.0)))
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: one worker of the data-parallel group."""
    import ray.train
    import ray.train.torch

    from raysv.tracking import StageLogger

    settings = config["settings"]
    method = build_method(config["method"], config["section"], settings["seed"], config.get("method_args", {}))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # The worker holds cpus_per_worker logical CPUs; let torch's intra-op pool use them
        # (the worker process starts with one thread).
        torch.set_num_threads(max(1, int(settings["ray"]["cpus_per_worker"])))
    torch.manual_seed(settings["seed"] + rank)
    method.bf16 = use_bf16(settings["ray"]["precision"], device.type)
    method.setup(device, ray.train.torch.prepare_model)

    start_epoch = 0
    history: list[dict[str, Any]] = []
    checkpoint = ray.train.get_checkpoint()
    progress = settings.get("progress_file")
    if checkpoint is not None:
        state, fallback = resume_state(checkpoint)
        if fallback and rank == 0 and progress:
            with open(progress, "a") as f:
                f.write(fallback + "\n")
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        history = list(state.get("history", []))
        log.info("rank %d resumes at epoch %d", rank, start_epoch)

    if rank == 0 and progress and start_epoch == 0:
        with open(progress, "a") as f:
            f.write(f"{method.name}: {world} worker(s) on {device.type}, {torch.get_num_threads()} torch threads each, "
                    f"{'bf16 autocast' if method.bf16 else 'fp32'} (ray.precision {settings['ray']['precision']})\n")
    shard = ray.train.get_dataset_shard("train")
    per_worker = max(method.batch_size // world, 1)
    tracker = StageLogger.from_config(config.get("mlflow")) if rank == 0 else None

    def batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        shuffle = settings["shuffle_buffer"] or None
        if not method.custom_batches:
            return shard.iter_torch_batches(batch_size=per_worker, drop_last=True, local_shuffle_buffer_size=shuffle,
                                            prefetch_batches=settings["prefetch_batches"], device=device)
        rows = shard.iter_batches(batch_size=ROWS_PER_READ, batch_format="numpy", local_shuffle_buffer_size=shuffle,
                                  prefetch_batches=settings["prefetch_batches"])
        return ({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in b.items()}
                for b in method.rebatch(rows, epoch, per_worker))

    record = config.get("record_dir")
    dev = config.get("dev_eval")

    def on_epoch_end(epoch: int, metrics: dict[str, Any], seen: np.ndarray) -> None:
        metrics = {**metrics, "worker_pid": os.getpid(), "world_size": world, "bf16": int(method.bf16)}
        if dev and rank == 0:
            metrics["dev_eer"] = dev_eer(method.encoder(), dev, device)
        if record:
            np.save(Path(record) / f"epoch{epoch}_rank{rank}_pid{os.getpid()}.npy", seen)
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch)
        if rank == 0:
            line = progress_line(method.name, epoch, method.epochs, metrics, history)
            log.debug(line)
            if progress:
                with open(progress, "a") as f:
                    f.write(line + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_model(tmp, method.encoder(), method.model_info())
                save_training_state(
                    tmp, {"method": method.state_dict(), "epoch": epoch, "rng": rng_state(), "history": history}
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    run_epochs(method, batches, start_epoch, on_epoch_end, lambda e: _fault_hook(config.get("fault"), e, rank),
               max_steps=settings.get("max_steps_per_epoch"))


def progress_line(name: str, epoch: int, epochs: int, metrics: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """One line per epoch: its loss and the figures a user watches, its time, the stage's ETA."""
    parts = [f"{name} epoch {epoch + 1}/{epochs}", f"loss {metrics.get('loss', float('nan')):.4f}"]
    for key, fmt in (("accuracy", "acc {:.3f}"), ("dev_eer", "dev EER {:.2%}"), ("dropped", "gate dropped {:.0f}"),
                     ("corrected", "relabelled {:.0f}")):
        if isinstance(metrics.get(key), (int, float)) and (key not in ("dropped", "corrected") or metrics[key]):
            parts.append(fmt.format(metrics[key]))
    parts.append(f"{metrics.get('crops_per_s', 0.0):.0f} crops/s")
    seconds = [h["epoch_seconds"] for h in history if isinstance(h.get("epoch_seconds"), (int, float))]
    parts.append(f"{metrics.get('epoch_seconds', 0.0):.1f} s")
    left = epochs - epoch - 1
    if left and seconds:
        parts.append(f"ETA {left * sum(seconds) / len(seconds) / 60:.1f} min")
    return ", ".join(parts)


def resume_state(checkpoint: Any) -> tuple[dict[str, Any], str | None]:
    """The training state of the checkpoint Ray Train resumes from, or, when that one is unreadable
    (a node died while writing it), of the newest readable one before it, with a warning naming the file."""
    with checkpoint.as_directory() as folder:
        try:
            return load_training_state(folder), None
        except Exception as err:  # noqa: BLE001 - a truncated torch file raises whatever the unpickler meets
            problem = f"{Path(checkpoint.path) / TRAINING_FILE} is unreadable ({type(err).__name__}: {err})"
    here = Path(checkpoint.path)
    for other in sorted(here.parent.glob("checkpoint_*"), reverse=True):  # named by time: newest first
        if other.name >= here.name or not other.is_dir():
            continue
        try:
            state = load_training_state(other)
        except Exception:  # noqa: BLE001
            continue
        warning = f"warning: {problem}: resuming from {other} instead (after epoch {int(state['epoch']) + 1})"
        log.warning(warning)
        return state, warning
    raise RuntimeError(f"{problem}, and no other checkpoint of this run can be read")
