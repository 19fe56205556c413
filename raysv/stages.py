"""What each stage does, given a config and the files of earlier stages.

The CLI's stage commands and the pipeline both call these; the pipeline adds
the run directory, completion markers, resume and MLflow runs around them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysv.config import Config

log = logging.getLogger("raysv")


def shard_count(shards: str | Path) -> int:
    """Number of utterances in the shards, from ``manifest.parquet``."""
    import pyarrow.parquet as pq

    manifest = Path(shards) / "manifest.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{shards} holds no manifest.parquet: prepare the shards with `raysv prepare`")
    return pq.ParquetFile(manifest).metadata.num_rows


def _steps(rows: int, cfg_batch: int, cfg: Config) -> int:
    per_worker = max(cfg_batch // cfg.ray.num_workers, 1)
    return max(rows // cfg.ray.num_workers // per_worker, 1)


def train_dino(cfg: Config, out: str | Path, *, run_name: str | None = None, mlflow: dict | None = None, **kw) -> Path:
    """Round 0: DINO on ECAPA-TDNN from the shards; the teacher backbone is saved."""
    from raysv.data.pipelines import check_augment, dino_dataset
    from raysv.train.trainer import ensure_ray, fit

    ensure_ray(cfg)
    check_augment(cfg.data.augment)
    rows = shard_count(cfg.data.shards)
    steps = _steps(rows, cfg.dino.batch_size, cfg)
    dataset = dino_dataset(cfg.data.shards, cfg)
    name = run_name or f"{cfg.name}-dino"
    log.info("DINO: %d utterances, %d steps/epoch, %d epochs", rows, steps, cfg.dino.epochs)
    return fit(cfg, "dino", dataset, out, run_name=name, method_args={"steps_per_epoch": steps}, mlflow=mlflow, **kw)


def pretrained_backbone(cfg: Config) -> str | None:
    """Where the round model's pre-trained WavLM comes from: hub id, folder, or a tiny one built here.

    ``finetune.model.tiny`` builds a randomly initialised small WavLM once, saves it with
    ``save_pretrained`` under the run directory, and returns that folder, so it is then
    loaded through the same ``from_pretrained`` path as a real checkpoint.
    """
    m = cfg.finetune.model
    if m.kind != "wavlm_mhfa":
        return None
    if not m.tiny:
        return m.pretrained
    from raysv.models.wavlm_mhfa import save_tiny_wavlm

    folder = (cfg.run_dir / "pretrained" / "tiny_wavlm").resolve()
    if not (folder / "config.json").is_file():
        save_tiny_wavlm(folder, seed=cfg.seed, **m.tiny)
    return str(folder)


def train_simclr(
    cfg: Config,
    out: str | Path,
    *,
    init: str | Path | None = None,
    run_name: str | None = None,
    mlflow: dict | None = None,
    **kw,
) -> Path:
    """End-to-end baseline: the round model trained with (AM-)NT-Xent on crops of one utterance, no labels."""
    from raysv.data.pipelines import check_augment, contrastive_dataset
    from raysv.train.trainer import ensure_ray, fit

    ensure_ray(cfg)
    check_augment(cfg.data.augment)
    s = cfg.simclr
    rows = shard_count(cfg.data.shards)
    steps = _steps(rows, s.batch_size, cfg)
    dataset = contrastive_dataset(cfg.data.shards, cfg, s.views, s.crop_seconds)
    args = {
        "steps_per_epoch": steps,
        "pretrained": pretrained_backbone(cfg),
        "init": str(Path(init).resolve()) if init else None,
    }
    name = run_name or f"{cfg.name}-simclr"
    log.info("SimCLR: %d utterances, %d views of %.1f s, %d steps/epoch", rows, s.views, s.crop_seconds, steps)
    return fit(cfg, "simclr", dataset, out, run_name=name, method_args=args, mlflow=mlflow, **kw)


def finetune(
    cfg: Config,
    labels: str | Path,
    out: str | Path,
    *,
    init: str | Path | None = None,
    large_margin: bool = False,
    run_name: str | None = None,
    mlflow: dict | None = None,
    **kw,
) -> Path:
    """Rounds >= 1: the round model fine-tuned with AAM-softmax on ``labels``.

    The labels it ends with (after label correction) are written beside the model
    as ``labels.parquet``.
    """
    from raysv.data.pipelines import check_augment, label_table, supervised_dataset
    from raysv.pseudo.labels import read_labels, write_labels
    from raysv.train.checkpoint import load_training_state
    from raysv.train.trainer import ensure_ray, fit

    ensure_ray(cfg)
    check_augment(cfg.data.augment)
    m = cfg.finetune.model
    if init is None and m.kind == "ecapa" and m.ecapa_init == "dino":
        raise ValueError("finetune.model.ecapa_init is 'dino': give the DINO checkpoint as the init model")
    utt_index, values = read_labels(labels)
    table = label_table(utt_index, values)
    rows = int((values >= 0).sum())
    seconds = cfg.lmft.crop_seconds if large_margin else cfg.finetune.crop_seconds
    steps = _steps(rows, cfg.finetune.batch_size, cfg)
    dataset = supervised_dataset(
        cfg.data.shards, table, cfg, seconds, with_clean=cfg.finetune.label_correction.enabled
    )
    args = {
        "steps_per_epoch": steps,
        "labels": str(Path(labels).resolve()),
        "init": str(Path(init).resolve()) if init else None,
        "large_margin": large_margin,
        "pretrained": pretrained_backbone(cfg),
    }
    name = run_name or f"{cfg.name}-{'lmft' if large_margin else 'finetune'}"
    log.info("fine-tune: %d labelled utterances, %d classes, %d steps/epoch", rows, int(values.max()) + 1, steps)
    out = fit(cfg, "supervised", dataset, out, run_name=name, method_args=args, mlflow=mlflow, **kw)
    final = load_training_state(out)["method"]["labels"].numpy()
    kept = final >= 0
    write_labels(out, np.nonzero(kept)[0], final[kept].astype(np.int32))
    return out


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | Path,
    *,
    plots_dir: str | Path | None = None,
    cohort: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Every trial list of the config (and the dev list), scored with the checkpoint.

    The decision threshold is set on the dev list when there is one, otherwise on
    the first test list, and stored in the checkpoint's ``model.json``.
    """
    from raysv.data.trials import read_trials, resolve_trial_audio
    from raysv.evaluation.evaluate import evaluate_trials
    from raysv.pseudo.extract import embed_files
    from raysv.train.checkpoint import read_model_json, write_model_json

    lists = dict(cfg.data.trials)
    if cfg.data.dev_trials is not None:
        lists = {"dev": cfg.data.dev_trials, **lists}
    if not lists:
        raise ValueError("data.trials is empty: name at least one trial list to evaluate on")
    top_n = cfg.eval.asnorm.top_n if cohort is not None else None
    # One pass of the actor pool embeds the audio of every list (a pass costs seconds to start).
    files = {name: resolve_trial_audio(read_trials(t.path), t.audio_root) for name, t in lists.items()}
    started = time.perf_counter()
    by_path = embed_files(
        checkpoint,
        {str(p): p for per_list in files.values() for p in per_list.values()},
        crops=cfg.eval.crops,
        crop_seconds=cfg.eval.crop_seconds,
        max_seconds=cfg.eval.max_seconds,
        seed=cfg.eval.seed,
    )
    embed_seconds = round(time.perf_counter() - started, 3)
    results: dict[str, dict[str, Any]] = {}
    threshold = None
    for name, trial_list in lists.items():
        plots = Path(plots_dir) / name if plots_dir else None
        metrics = evaluate_trials(
            trial_list.path,
            trial_list.audio_root,
            checkpoint=checkpoint,
            cohort=cohort,
            top_n=top_n,
            plots_dir=plots,
            threshold=threshold,
            embeddings={utt: by_path[str(p)] for utt, p in files[name].items()},
        )
        metrics["embed_seconds"] = embed_seconds  # of the shared pass over all lists
        if threshold is None:
            threshold = float(metrics["threshold"])
        results[name] = metrics
    meta = read_model_json(checkpoint)
    meta["threshold"] = threshold
    meta["threshold_from"] = next(iter(lists))
    meta["eval"] = {
        "crops": cfg.eval.crops,
        "crop_seconds": cfg.eval.crop_seconds,
        "max_seconds": cfg.eval.max_seconds,
        "seed": cfg.eval.seed,
    }
    if cohort is not None and top_n:
        np.save(Path(checkpoint) / "cohort.npy", cohort.astype(np.float32))
        meta["cohort"] = "cohort.npy"
        meta["asnorm_top_n"] = int(top_n)
    write_model_json(checkpoint, meta)
    return results


def extract(cfg: Config, checkpoint: str | Path, out: str | Path, shards: str | Path | None = None) -> dict:
    """Embeddings of every training utterance with the checkpoint."""
    from raysv.pseudo.extract import extract_embeddings
    from raysv.train.trainer import ensure_ray, use_gpu

    ensure_ray(cfg)
    return extract_embeddings(
        checkpoint,
        shards or cfg.data.shards,
        out,
        max_seconds=cfg.extract.max_seconds,
        batch_size=cfg.extract.batch_size,
        num_actors=cfg.extract.num_actors,
        use_gpu=use_gpu(cfg),
    )


def cluster(cfg: Config, embeddings: str | Path, out: str | Path) -> dict:
    """Pseudo-labels from embeddings: k-means then AHC of the centroids, in a Ray actor."""
    from raysv.pseudo.cluster import run_clustering
    from raysv.train.trainer import ensure_ray, use_gpu

    ensure_ray(cfg)
    manifest = Path(cfg.data.shards) / "manifest.parquet"
    c = cfg.cluster
    return run_clustering(
        Path(embeddings) / "embeddings.parquet" if Path(embeddings).is_dir() else embeddings,
        out,
        k1=c.k1,
        k2=c.k2,
        min_cluster_size=c.min_cluster_size,
        niter=c.niter,
        seed=c.seed,
        manifest=manifest if manifest.is_file() else None,
        use_gpu=use_gpu(cfg),
    )


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    tmp.replace(path)
