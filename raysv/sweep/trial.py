"""One Tune trial: cluster a round's embeddings with the sampled settings, then fine-tune, reporting dev EER."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from raysv.config import deep_merge
from raysv.run_config import Config, config_from_dict, round_config
from raysv.sweep.spec import nested, plain


def trial_config(base: dict[str, Any], round_index: int, params: dict[str, Any]) -> Config:
    """Round ``round_index``'s config with a trial's sampled settings applied."""
    cfg = round_config(config_from_dict(base), round_index)
    return config_from_dict(deep_merge(cfg.to_dict(), nested({k: plain(v) for k, v in params.items()})))


def trial_tags(ctx: dict[str, Any], trial_id: str) -> dict[str, str]:
    return {"raysv.run": ctx["run"], "raysv.sweep": ctx["name"], "raysv.trial": trial_id}


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: cluster with the sampled settings, then fine-tune, reporting dev EER per epoch."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysv.artifacts.checkpoint import load_training_state
    from raysv.stages.cluster import cluster
    from raysv.stages.finetune import finetune, finetune_init
    from raysv.tracking import Tracker

    r = ctx["round"]
    cfg = trial_config(ctx["config"], r, params)
    trial_id = tune.get_context().get_trial_id()
    folder = Path(ctx["folder"]) / "trials" / trial_id
    tracker = Tracker(cfg.mlflow, cfg.runs)
    flat = {k: plain(v) for k, v in params.items()}
    child = tracker.start_run(f"{ctx['name']}/{trial_id}", trial_tags(ctx, trial_id), parent=ctx["parent"],
                              params={**flat, "trial_id": trial_id, "round": r})
    started = time.time()
    try:
        # Tune puts a trial's child tasks into the trial's (token) placement group; the clustering
        # actor needs a CPU of its own, so it is started from a task scheduled outside that group.
        clustering = ray.remote(cluster).options(num_cpus=0, scheduling_strategy="DEFAULT")
        diag = ray.get(clustering.remote(cfg, ctx["embeddings"], folder / "cluster"))
        tracker.log_metrics(child, {f"cluster.{k}": diag.get(k) for k in ("nmi", "ari", "purity", "num_clusters")
                                    if isinstance(diag.get(k), (int, float))})
        out = finetune(
            cfg,
            folder / "cluster" / "labels.parquet",
            folder / "model",
            init=finetune_init(cfg, r),
            run_name=f"{ctx['run']}-sweep-{ctx['name']}-{trial_id}",
            mlflow={"tracking_uri": tracker.uri, "run_id": child},
            dev_eval=ctx["dev"],
            callbacks=[TuneReportCallback()],
        )
        last = load_training_state(out)["history"][-1]
        final = {f"final.{k}": last[k] for k in ("dev_eer", "loss", "accuracy") if isinstance(last.get(k), (int, float))}
        tracker.log_metrics(child, {**final, "minutes": (time.time() - started) / 60.0})
        tracker.end_run(child)
    except Exception:
        tracker.end_run(child, status="FAILED")
        raise


