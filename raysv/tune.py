"""Ray Tune sweeps over one round's clustering and fine-tuning, scored by dev-trial EER.

A sweep YAML names a run config whose run directory already holds
``round_{r-1}/extract`` (``raysv run --until round_{r-1}/extract``). Each Tune trial
is a plain function (Ray 2.60's Train-in-Tune pattern): it applies its sampled
settings to round r's config, clusters the round's embeddings into its own folder,
then fits the round model with a ``TorchTrainer`` whose ``TuneReportCallback``
passes rank 0's per-epoch ``dev_eer`` to Tune, so ASHA can stop poor trials early.
The best trial's settings are written as per-round overrides for
``raysv run --merge best.yaml``; they leave completed stages untouched.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysv.config import Config, ConfigError, config_from_dict, deep_merge, from_dict, load_config, round_config

log = logging.getLogger("raysv.tune")

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
# What a trial runs (clustering and fine-tuning of one round) depends only on these keys.
SWEEPABLE = ("cluster.", "finetune.", "data.augment.", "data.shuffle_buffer", "seed")


@dataclass
class SchedulerSpec:
    type: str = "asha"  # asha | fifo
    grace_period: int = 1
    max_t: int | None = None  # default: the round's finetune.epochs
    reduction_factor: float = 4.0


@dataclass
class SweepSpec:
    """The sweep YAML: which run and round, what to search, how to schedule trials."""

    config: str
    search_space: dict[str, dict[str, Any]]
    round: int = 1
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 1
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    metric: str = "dev_eer"
    mode: str = "min"
    name: str = "sweep"
    output: str | None = None  # relative to <run_dir>/sweeps/<name>; default best.yaml
    max_concurrent_trials: int | None = None  # default: as many as the cluster's resources fit


# ---------------------------------------------------------------- the sweep YAML


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _plain(value: Any) -> Any:
    """NumPy scalars from samplers → Python numbers, so YAML and MLflow take them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, list[str]]:
    """Read and check a sweep YAML; ``sweep.<key>=v`` overrides go to it, the others to the run config."""
    from raysv.config import parse_override

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    run_overrides: list[str] = []
    for text in overrides or []:
        if text.startswith("sweep."):
            data = deep_merge(data, parse_override(text[len("sweep."):]))
        else:
            run_overrides.append(text)
    missing = [k for k in ("config", "search_space") if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing {', '.join(missing)}")
    try:
        spec = from_dict(SweepSpec, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if spec.scheduler.type not in ("asha", "fifo"):
        raise ConfigError(f"{path}: scheduler.type: expected asha or fifo, got {spec.scheduler.type!r}")
    if spec.mode not in ("min", "max"):
        raise ConfigError(f"{path}: mode: expected min or max, got {spec.mode!r}")
    if spec.num_samples < 1 or spec.scheduler.grace_period < 1 or spec.scheduler.reduction_factor <= 1:
        raise ConfigError(f"{path}: num_samples and scheduler.grace_period must be >= 1, reduction_factor > 1")
    if not spec.search_space:
        raise ConfigError(f"{path}: search_space is empty")
    if not spec.name or "/" in spec.name:
        raise ConfigError(f"{path}: name: a non-empty folder name, got {spec.name!r}")
    config = Path(spec.config)
    if not config.is_absolute() and not config.is_file() and (path.parent / config).is_file():
        spec.config = str(path.parent / config)
    return spec, list(spec.overrides) + run_overrides


def _candidates(key: str, spec: Any) -> list[Any]:
    """The values a search-space entry can take that are worth checking against the schema."""
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"search_space.{key}: expected one of {{{': […]}, {'.join(KINDS)}: […]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search_space.{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"search_space.{key}.{kind}: expected [low, high], got {values!r}")
        if not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError(f"search_space.{key}.{kind}: need 0 < low < high for loguniform, low < high otherwise")
        return [values[0], values[1] - 1 if kind == "randint" else values[1]]
    return list(values)


def check_search_space(cfg: Config, round_index: int, space: dict[str, dict[str, Any]]) -> None:
    """Every key must be a real config key a trial uses; every value must pass the run config's checks."""
    base = round_config(cfg, round_index).to_dict()
    values: dict[str, list[Any]] = {}
    for key, spec in space.items():
        if not key.startswith(SWEEPABLE) or key.endswith("."):
            raise ConfigError(
                f"search_space.{key}: a trial clusters and fine-tunes round {round_index}, so only "
                f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in SWEEPABLE)} can change it"
            )
        values[key] = _candidates(key, spec)
        for value in values[key]:
            try:
                config_from_dict(deep_merge(base, nested({key: value})))
            except ConfigError as err:
                raise ConfigError(f"search_space.{key} = {value!r}: {err}") from None
    combos = list(itertools.islice(itertools.product(*values.values()), 2000))
    for combo in combos:  # cross-key checks, e.g. cluster.k2 < cluster.k1
        params = dict(zip(values, combo))
        try:
            config_from_dict(deep_merge(base, nested(params)))
        except ConfigError as err:
            raise ConfigError(f"search_space: {params} is not a valid config: {err}") from None


def _speakers_of(trials_path: str) -> set[str]:
    from raysv.data.trials import read_trials

    return {u.split("/", 1)[0] for u in read_trials(trials_path).utterances() if "/" in u}


def check_dev_trials(cfg: Config) -> None:
    """The dev list must exist and share no speaker with the training shards or the test lists."""
    dev = cfg.data.dev_trials
    if dev is None or not dev.path:
        raise ConfigError(
            "data.dev_trials: a sweep scores trials on a dev trial list whose speakers are in neither "
            "the training data nor the test lists; set data.dev_trials: {path: …, audio_root: …}"
        )
    dev_speakers = _speakers_of(dev.path)
    clash: dict[str, set[str]] = {}
    for name, trial_list in cfg.data.trials.items():
        if Path(trial_list.path).resolve() == Path(dev.path).resolve():
            raise ConfigError(f"data.dev_trials: {dev.path} is also the test list data.trials.{name}")
        if Path(trial_list.path).is_file():
            clash[f"data.trials.{name}"] = dev_speakers & _speakers_of(trial_list.path)
    manifest = Path(cfg.data.shards) / "manifest.parquet"
    if manifest.is_file():
        import pyarrow.parquet as pq

        if "speaker" in pq.read_schema(manifest).names:
            train = {s for s in pq.read_table(manifest, columns=["speaker"]).column("speaker").to_pylist() if s}
            clash["the training shards"] = dev_speakers & train
    for where, shared in clash.items():
        if shared:
            raise ConfigError(
                f"data.dev_trials: {len(shared)} speakers of {dev.path} are also in {where} "
                f"(e.g. {', '.join(sorted(shared)[:3])}); use a dev list of other speakers"
            )


# ---------------------------------------------------------------- the trial


def trial_config(base: dict[str, Any], round_index: int, params: dict[str, Any]) -> Config:
    """Round ``round_index``'s config with a trial's sampled settings applied."""
    cfg = round_config(config_from_dict(base), round_index)
    return config_from_dict(deep_merge(cfg.to_dict(), nested({k: _plain(v) for k, v in params.items()})))


def _trial_tags(ctx: dict[str, Any], trial_id: str) -> dict[str, str]:
    return {"raysv.run": ctx["run"], "raysv.sweep": ctx["name"], "raysv.trial": trial_id}


def run_trial(params: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: cluster with the sampled settings, then fine-tune, reporting dev EER per epoch."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysv import stages
    from raysv.pipeline import finetune_init
    from raysv.tracking import Tracker
    from raysv.train.checkpoint import load_training_state

    r = ctx["round"]
    cfg = trial_config(ctx["config"], r, params)
    trial_id = tune.get_context().get_trial_id()
    folder = Path(ctx["folder"]) / "trials" / trial_id
    tracker = Tracker(cfg)
    flat = {k: _plain(v) for k, v in params.items()}
    child = tracker.start_run(f"{ctx['name']}/{trial_id}", _trial_tags(ctx, trial_id), parent=ctx["parent"],
                              params={**flat, "trial_id": trial_id, "round": r})
    started = time.time()
    try:
        # Tune puts a trial's child tasks into the trial's (token) placement group; the clustering
        # actor needs a CPU of its own, so it is started from a task scheduled outside that group.
        clustering = ray.remote(stages.cluster).options(num_cpus=0, scheduling_strategy="DEFAULT")
        diag = ray.get(clustering.remote(cfg, ctx["embeddings"], folder / "cluster"))
        tracker.log_metrics(child, {f"cluster.{k}": diag.get(k) for k in ("nmi", "ari", "purity", "num_clusters")
                                    if isinstance(diag.get(k), (int, float))})
        out = stages.finetune(
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


# ---------------------------------------------------------------- the driver


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

    from raysv.train.trainer import use_gpu

    resources = ray.cluster_resources()
    if use_gpu(cfg):
        return max(int(resources.get("GPU", 0) // cfg.ray.num_workers), 1)
    per_trial = cfg.ray.num_workers * cfg.ray.cpus_per_worker + 1
    return max(int(resources.get("CPU", 0) // per_trial), 1)


def _param_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def _completed_stage_changes(cfg: Config, merged: Config) -> list[str]:
    """Completed stages whose config the merged best settings would change (they would need a restart)."""
    from raysv.pipeline import RunState, plan, stage_config

    state = RunState(cfg.run_dir)
    return [s.id for s in plan(cfg) if state.done(s) is not None
            and json.loads(json.dumps(stage_config(merged, s))) != state.done(s)["config"]]


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
            "params": {k: _plain(v) for k, v in (result.config or {}).items()},
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

    from raysv.pipeline import MARKER, ConfigChanged, RunState, _check_unchanged, plan
    from raysv.stages import pretrained_backbone
    from raysv.tracking import Tracker
    from raysv.train.trainer import ensure_ray, storage_path

    spec, run_overrides = load_sweep(config_path, overrides)
    cfg = load_config(spec.config, run_overrides)
    r = spec.round
    if not 1 <= r <= cfg.rounds.count:
        raise ConfigError(f"round: {r} is not a fine-tuning round of {spec.config} (rounds.count is {cfg.rounds.count})")
    rcfg = round_config(cfg, r)
    check_dev_trials(rcfg)
    check_search_space(cfg, r, spec.search_space)
    extract = cfg.run_dir / f"round_{r - 1}" / "extract"
    if not (extract / MARKER).is_file():
        raise FileNotFoundError(
            f"{extract} is not complete: run `raysv run --config {spec.config} --until round_{r - 1}/extract` first"
        )
    try:
        _check_unchanged(cfg, plan(cfg), RunState(cfg.run_dir))
    except ConfigChanged as err:
        raise ConfigError(f"the run config does not match run directory {cfg.run_dir}: {err}") from None
    max_t = spec.scheduler.max_t or rcfg.finetune.epochs

    folder = (cfg.run_dir / "sweeps" / spec.name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"sweep": dataclasses.asdict(spec), "run_overrides": run_overrides}
    saved = folder / "sweep.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(settings)):
        raise ConfigError(f"sweep {spec.name!r} already ran with other settings ({saved}); give it another name")
    saved.write_text(json.dumps(settings, indent=2, default=str))

    ensure_ray(cfg)
    pretrained_backbone(rcfg)  # a tiny WavLM is built once here, not by concurrent trials
    tracker = Tracker(cfg)
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
        "folder": str(folder), "embeddings": str(extract.resolve() / "embeddings.parquet"),
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
    storage = storage_path(cfg)
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
    changed = _completed_stage_changes(cfg, merged)
    if changed:
        log.warning("completed stages %s ran with other settings; continue with --restart-from %s",
                    ", ".join(changed), changed[0])
    summary = {
        "best": best["params"], spec.metric: best[spec.metric], "best_trial": best["trial_id"],
        "output": str(output), "trials": rows, "restart_from": changed[0] if changed else None,
        "minutes": (time.time() - started) / 60.0,
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
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
        run_id = tracker.find_run(_trial_tags(ctx, row["trial_id"]))
        if run_id is None:
            continue
        tracker.client.set_tag(run_id, "raysv.status", row["status"])
        tracker.log_metrics(run_id, {"iterations": row["iterations"], f"last.{metric}": row[metric]})
        tracker.end_run(run_id, status=status[row["status"]])
