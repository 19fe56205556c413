"""Run a sweep with Ray Tune: trials over one round, the best settings written as ``--merge`` YAML."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from raysv.artifacts.jsonio import write_json
from raysv.config import ConfigError, deep_merge
from raysv.run_config import Config, config_from_dict, load_config, round_config
from raysv.sweep.spec import SweepSpec, check_dev_trials, check_search_space, load_sweep, nested, plain
from raysv.sweep.trial import run_trial, trial_tags

log = logging.getLogger("raysv.sweep")

def _absolute(cfg: Config) -> dict[str, Any]:
    """The config with local paths made absolute: Tune runs each trial in its own working directory."""

    def fix(path: str | None) -> str | None:
        return path if not path or "://" in path else str(Path(path).resolve())

    data = cfg.to_dict()
    data["runs"] = fix(data["runs"])
    d = data["data"]
    d["shards"] = fix(d["shards"])
    for trial_list in [*d["trials"].values(), d["dev_trials"]]:
        if trial_list:
            trial_list["path"], trial_list["audio_root"] = fix(trial_list["path"]), fix(trial_list["audio_root"])
    d["augment"]["musan"], d["augment"]["rir"] = fix(d["augment"]["musan"]), fix(d["augment"]["rir"])
    data["ray"]["storage"] = fix(data["ray"]["storage"])
    pretrained = data["finetune"]["model"]["pretrained"]
    if pretrained and Path(pretrained).exists():
        data["finetune"]["model"]["pretrained"] = fix(pretrained)
    return data


def max_concurrent(cfg: Config) -> int:
    """Trials that fit at once: GPUs per trial when training on GPUs, else CPUs (+1 for data) per trial."""
    import ray

    from raysv.runtime import use_gpu

    resources = ray.cluster_resources()
    if use_gpu(cfg.ray.use_gpu):
        return max(int(resources.get("GPU", 0) // cfg.ray.num_workers), 1)
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1
    return max(int(resources.get("CPU", 0) // per_trial), 1)


def _param_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def _trial_rows(results, spec: SweepSpec, max_t: int) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        history = []
        df = result.metrics_dataframe
        if df is not None and spec.metric in df:
            history = [float(v) for v in df[spec.metric].dropna()]
        iterations = int(metrics.get("training_iteration", 0) or 0)
        status = "error" if result.error else ("completed" if iterations >= max_t else "stopped")
        rows.append({
            "trial_id": trial_id,
            "params": {k: plain(v) for k, v in (result.config or {}).items()},
            spec.metric: history[-1] if history else None,
            "history": history,
            "iterations": iterations,
            "status": status,
            "error": str(result.error).splitlines()[0][:300] if result.error else None,
        })
    return sorted(rows, key=lambda row: row["trial_id"])


def _best(rows: list[dict[str, Any]], spec: SweepSpec) -> dict[str, Any]:
    """Among trials that ran every epoch (others were stopped on earlier, not comparable, figures)."""
    scored = [r for r in rows if r["status"] == "completed" and r[spec.metric] is not None]
    scored = scored or [r for r in rows if r[spec.metric] is not None]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows if r["error"])
        raise RuntimeError(f"no trial reported {spec.metric}: {errors or 'no trial ran'}")
    sign = 1.0 if spec.mode == "min" else -1.0
    return min(scored, key=lambda r: sign * r[spec.metric])


def format_trials(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    lines = [f"{'trial':<18} {'status':<10} {'iter':>4} {metric:>8}  " + "  ".join(keys)]
    for r in rows:
        value = f"{100 * r[metric]:7.2f}%" if isinstance(r[metric], float) else "       -"
        params = "  ".join(f"{r['params'].get(k)!s:>{len(k)}}" for k in keys)
        lines.append(f"{r['trial_id']:<18} {r['status']:<10} {r['iterations']:>4} {value}  {params}")
    return "\n".join(lines)


def run_sweep(config_path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run (or, re-run with the same settings, finish) a sweep; write the best settings as a YAML.

    Returns ``{"best": params, "dev_eer": value, "output": path, "trials": [...], "restart_from": …}``.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raysv.pipeline import ConfigChanged, RunState, check_unchanged, completed_stage_changes, plan
    from raysv.runtime import ensure_ray, storage_path
    from raysv.stages.base import pretrained_backbone
    from raysv.tracking import Tracker

    spec, run_overrides = load_sweep(config_path, overrides)
    cfg = load_config(spec.config, run_overrides)
    r = spec.round
    if not 1 <= r <= cfg.rounds.count:
        raise ConfigError(f"round: {r} is not a fine-tuning round of {spec.config} (rounds.count is {cfg.rounds.count})")
    rcfg = round_config(cfg, r)
    check_dev_trials(rcfg)
    check_search_space(cfg, r, spec.search_space)
    extract = cfg.layout.stage(f"round_{r - 1}/extract")
    if not cfg.layout.marker(f"round_{r - 1}/extract").is_file():
        raise FileNotFoundError(
            f"{extract} is not complete: run `raysv run --config {spec.config} --until round_{r - 1}/extract` first"
        )
    try:
        check_unchanged(cfg, plan(cfg), RunState(cfg.run_dir))
    except ConfigChanged as err:
        raise ConfigError(f"the run config does not match run directory {cfg.run_dir}: {err}") from None
    max_t = spec.scheduler.max_t or rcfg.finetune.epochs

    folder = cfg.layout.sweep(spec.name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"sweep": dataclasses.asdict(spec), "run_overrides": run_overrides}
    saved = folder / "sweep.json"
    settings = json.loads(json.dumps(settings, default=str))
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise ConfigError(f"sweep {spec.name!r} already ran with other settings ({saved}); give it another name")
    write_json(saved, settings)

    ensure_ray(cfg.ray)
    pretrained_backbone(rcfg)  # a tiny WavLM is built once here, not by concurrent trials
    tracker = Tracker(cfg.mlflow, cfg.runs)
    pipeline_parent = RunState(cfg.run_dir).data.get("mlflow_parent")
    parent = tracker.start_run(
        f"sweep {spec.name}", {"raysv.run": cfg.name, "raysv.kind": "sweep", "raysv.sweep": spec.name},
        parent=pipeline_parent, params={"round": r, "search_space": spec.search_space, "scheduler": spec.scheduler.type},
    )
    base = _absolute(cfg)
    base["mlflow"]["tracking_uri"] = tracker.uri
    dev = dataclasses.asdict(rcfg.data.dev_trials)
    ctx = {
        "config": base, "round": r, "name": spec.name, "run": cfg.name, "parent": parent,
        "folder": str(folder), "embeddings": str(cfg.layout.embeddings(r - 1).resolve()),
        "dev": {"path": str(Path(dev["path"]).resolve()), "audio_root": str(Path(dev["audio_root"]).resolve()),
                "max_seconds": rcfg.eval.max_seconds},
    }
    # The trial only drives its TorchTrainer; a token CPU share (0 is refused) leaves the CPUs to the workers.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": 0.01})
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                  grace_period=min(spec.scheduler.grace_period, max_t),
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    concurrent = spec.max_concurrent_trials or max_concurrent(rcfg)
    storage = storage_path(cfg.ray, cfg.run_dir)
    experiment = f"{cfg.name}-sweep-{spec.name}"
    path = f"{storage.rstrip('/')}/{experiment}"
    started = time.time()
    log.info("sweep %s: round %d, up to %d trials at once, %s scheduler, max_t %d",
             spec.name, r, concurrent, spec.scheduler.type, max_t)
    try:
        if tune.Tuner.can_restore(path):
            log.info("sweep %s: continuing the experiment in %s", spec.name, path)
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_param_space(spec.search_space),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                            num_samples=spec.num_samples, max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(name=experiment, storage_path=storage, verbose=1),
            )
        results = tuner.fit()
        rows = _trial_rows(results, spec, max_t)
        _close_trial_runs(tracker, ctx, rows, spec.metric)
        best = _best(rows, spec)
    except BaseException:
        tracker.end_run(parent, status="FAILED")
        raise

    merge = {"rounds": {"overrides": {r: nested(best["params"])}}}
    output = Path(spec.output or "best.yaml")
    output = output if output.is_absolute() else folder / output
    output.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Best of sweep {spec.name} (round {r}): {spec.metric} {best[spec.metric]:.4f}, trial {best['trial_id']}.\n"
              f"# Use: raysv run --config {spec.config} --merge {output}\n")
    output.write_text(header + yaml.safe_dump(merge, sort_keys=True))
    merged = config_from_dict(deep_merge(cfg.to_dict(), merge))
    changed = completed_stage_changes(cfg, merged)
    if changed:
        log.warning("completed stages %s ran with other settings; continue with --restart-from %s",
                    ", ".join(changed), changed[0])
    summary = {
        "best": best["params"], spec.metric: best[spec.metric], "best_trial": best["trial_id"],
        "output": str(output), "trials": rows, "restart_from": changed[0] if changed else None,
        "minutes": (time.time() - started) / 60.0,
    }
    write_json(folder / "summary.json", json.loads(json.dumps(summary, default=str)))
    tracker.log_metrics(parent, {f"best.{spec.metric}": best[spec.metric], "trials": len(rows),
                                 "stopped": sum(r_["status"] == "stopped" for r_ in rows),
                                 "minutes": summary["minutes"]})
    tracker.log_artifact(parent, output)
    tracker.log_artifact(parent, folder / "summary.json")
    tracker.end_run(parent)
    print(format_trials(rows, spec.metric))
    print(f"\nbest: {best['params']} ({spec.metric} {best[spec.metric]:.4f}) → {output}")
    print(f"next: raysv run --config {spec.config} --merge {output}")
    return summary


def _close_trial_runs(tracker, ctx: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> None:
    """Mark each trial's MLflow run: finished, killed (stopped by the scheduler) or failed."""
    status = {"completed": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for row in rows:
        run_id = tracker.find_run(trial_tags(ctx, row["trial_id"]))
        if run_id is None:
            continue
        tracker.client.set_tag(run_id, "raysv.status", row["status"])
        tracker.log_metrics(run_id, {"iterations": row["iterations"], f"last.{metric}": row[metric]})
        tracker.end_run(run_id, status=status[row["status"]])
