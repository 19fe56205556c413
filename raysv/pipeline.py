"""The rounds: which stage runs next, resume, the run directory, the results table.

Stages, in order (R = ``rounds.count``)::

    round_0/dino → [baseline/simclr → baseline/simclr_eval] → round_0/eval → round_0/extract → round_0/cluster
    round_r/finetune → round_r/eval → round_r/extract → round_r/cluster   (r = 1 .. R-1)
    round_R/finetune → round_R/eval → round_R/lmft → round_R/lmft_eval

A stage writes only into ``<runs>/<name>/<stage>/``; it is complete when its
marker ``_complete.json`` is written, last, and then recorded in ``state.json``.
Re-running the same command skips complete stages and resumes the first
incomplete one (training resumes from its last epoch checkpoint).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysv.config import Config, round_config, to_dict
from raysv.stages import write_json

log = logging.getLogger("raysv")

MARKER = "_complete.json"
STATE = "state.json"


@dataclass(frozen=True)
class Stage:
    id: str  # e.g. "round_1/finetune"
    kind: str  # dino | simclr | finetune | lmft | eval | extract | cluster
    round: int
    model: str  # id of the stage whose model this stage uses or makes

    @property
    def folder(self) -> str:
        return self.id


def plan(cfg: Config) -> list[Stage]:
    """Every stage of the run, in order."""
    stages = [Stage("round_0/dino", "dino", 0, "round_0/dino")]
    if cfg.simclr.enabled:  # the end-to-end contrastive baseline, scored like every other model
        stages += [Stage("baseline/simclr", "simclr", 0, "baseline/simclr"),
                   Stage("baseline/simclr_eval", "eval", 0, "baseline/simclr")]
    if cfg.rounds.count == 0:
        return stages + [Stage("round_0/eval", "eval", 0, "round_0/dino")]
    model = "round_0/dino"
    asnorm = cfg.eval.asnorm.top_n is not None
    for r in range(cfg.rounds.count + 1):
        last = r == cfg.rounds.count
        if r > 0:
            model = f"round_{r}/finetune"
            stages.append(Stage(model, "finetune", r, model))
        after = [] if last else [Stage(f"round_{r}/extract", "extract", r, model), Stage(f"round_{r}/cluster", "cluster", r, model)]
        evaluate = [Stage(f"round_{r}/eval", "eval", r, model)]
        stages += (after + evaluate) if asnorm else (evaluate + after)
    r = cfg.rounds.count
    if cfg.lmft.enabled:
        stages.append(Stage(f"round_{r}/lmft", "lmft", r, f"round_{r}/lmft"))
        stages.append(Stage(f"round_{r}/lmft_eval", "eval", r, f"round_{r}/lmft"))
    return stages


def stage_config(cfg: Config, stage: Stage) -> dict[str, Any]:
    """The part of the config a stage's output depends on: a change here invalidates it."""
    c = round_config(cfg, max(stage.round, 1)) if stage.kind in ("finetune", "lmft") else cfg
    if stage.kind == "cluster":
        # Labels for round r+1 are made with round r+1's clustering settings.
        c = round_config(cfg, stage.round + 1)
    data = {"shards": c.data.shards, "augment": to_dict(c.data.augment)}
    if stage.kind == "dino":
        return {"seed": c.seed, "data": data, "dino": to_dict(c.dino)}
    if stage.kind == "simclr":
        return {"seed": c.seed, "data": data, "simclr": to_dict(c.simclr), "model": to_dict(c.finetune.model)}
    if stage.kind == "finetune":
        return {"seed": c.seed, "data": data, "finetune": to_dict(c.finetune)}
    if stage.kind == "lmft":
        return {"seed": c.seed, "data": data, "finetune": to_dict(c.finetune), "lmft": to_dict(c.lmft)}
    if stage.kind == "extract":
        return {"shards": c.data.shards, "max_seconds": c.extract.max_seconds}
    if stage.kind == "cluster":
        return {"cluster": to_dict(c.cluster)}
    if stage.kind == "eval":
        return {
            "eval": to_dict(c.eval),
            "trials": to_dict(c.data.trials),
            "dev_trials": to_dict(c.data.dev_trials),
        }
    raise ValueError(stage.kind)


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [k for key in keys for k in _diff(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


class RunState:
    """``state.json``: completed stages with their config, figures and time; the MLflow parent run."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STATE
        self.data: dict[str, Any] = {"stages": {}, "mlflow_parent": None}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())

    def done(self, stage: Stage) -> dict[str, Any] | None:
        return self.data["stages"].get(stage.id)

    def record(self, stage: Stage, entry: dict[str, Any]) -> None:
        self.data["stages"][stage.id] = entry
        self.save()

    def forget(self, stage: Stage) -> None:
        self.data["stages"].pop(stage.id, None)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


class ConfigChanged(ValueError):
    """A completed stage's config differs from the current one."""


def run_pipeline(
    cfg: Config,
    until: str | None = None,
    restart_from: str | None = None,
    fault: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or continue) every stage; return the results table also written to ``results.json``."""
    from raysv.tracking import Tracker
    from raysv.train.trainer import ensure_ray

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = plan(cfg)
    ids = [s.id for s in stages]
    for name, value in (("--until", until), ("--restart-from", restart_from)):
        if value is not None and value not in ids:
            raise ValueError(f"{name} {value!r}: no such stage; stages are {', '.join(ids)}")
    state = RunState(run_dir)
    if restart_from is not None:
        for stage in stages[ids.index(restart_from):]:
            _reset_stage(cfg, stage, state)
    _check_unchanged(cfg, stages, state)
    write_json(run_dir / "config.json", cfg.to_dict())

    tracker = Tracker(cfg)
    parent = tracker.start_run(cfg.name, {"raysv.run": cfg.name, "raysv.kind": "pipeline"}, params=cfg.to_dict())
    state.data["mlflow_parent"] = parent
    state.save()
    ensure_ray(cfg)
    try:
        for stage in stages:
            if state.done(stage) is None:
                _run_stage(cfg, stage, state, tracker, parent, fault)
            if stage.id == until:
                log.info("stopping after %s (--until)", until)
                break
        results = summarise(cfg, stages, state)
        write_json(run_dir / "results.json", results)
        _log_summary(cfg, tracker, parent, results, finished=until is None or until == ids[-1])
    except BaseException:
        tracker.end_run(parent, status="FAILED")
        raise
    print(format_table(results))
    print(f"\nMLflow: mlflow ui --backend-store-uri {tracker.uri}")
    return results


def _check_unchanged(cfg: Config, stages: list[Stage], state: RunState) -> None:
    for stage in stages:
        entry = state.done(stage)
        if entry is None:
            continue
        changes = _diff(entry["config"], json.loads(json.dumps(stage_config(cfg, stage))))
        if changes:
            raise ConfigChanged(
                f"stage {stage.id} is complete but its config changed:\n  " + "\n  ".join(changes)
                + f"\nrun again with --restart-from {stage.id} to redo it and everything after it"
            )


def _reset_stage(cfg: Config, stage: Stage, state: RunState) -> None:
    """Forget a stage and delete its outputs (and its Ray Train run) so it starts afresh."""
    from raysv.train.trainer import storage_path

    state.forget(stage)
    folder = cfg.run_dir / stage.folder
    if folder.exists():
        shutil.rmtree(folder)
    storage = storage_path(cfg)
    if "://" not in storage:
        shutil.rmtree(Path(storage) / _train_name(cfg, stage), ignore_errors=True)


def _train_name(cfg: Config, stage: Stage) -> str:
    return f"{cfg.name}-{stage.id.replace('/', '-')}"


def _model_dir(cfg: Config, stage_id: str) -> Path:
    return cfg.run_dir / stage_id / "model"


def finetune_init(rcfg: Config, round_index: int) -> Path | None:
    """The checkpoint round ``round_index`` fine-tunes from; None: the pre-trained WavLM (or a fresh ECAPA).

    ``rcfg`` is the round's config (``round_config``). ``finetune.init: previous`` continues
    from the previous round's model (from round 2 on); otherwise every round restarts from
    the round model's initial weights, which for an ECAPA with ``ecapa_init: dino`` is the
    DINO encoder. Sweeps start their trials from the same checkpoint.
    """
    if rcfg.finetune.init == "previous" and round_index > 1:
        return _model_dir(rcfg, f"round_{round_index - 1}/finetune")
    if rcfg.finetune.model.kind == "ecapa" and rcfg.finetune.model.ecapa_init == "dino":
        return _model_dir(rcfg, "round_0/dino")
    return None


def _run_stage(cfg: Config, stage: Stage, state: RunState, tracker, parent: str, fault: dict | None) -> None:
    from raysv import stages as st

    folder = cfg.run_dir / stage.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).unlink(missing_ok=True)
    config = stage_config(cfg, stage)
    child = tracker.start_run(stage.id, {"raysv.run": cfg.name, "raysv.stage": stage.id}, parent=parent, params=config)
    mlflow = {"tracking_uri": tracker.uri, "run_id": child}
    log.info("=== %s ===", stage.id)
    started = time.time()
    metrics: dict[str, Any] = {}
    artifacts: list[Path] = []
    rcfg = round_config(cfg, max(stage.round, 1))
    train_kw = {"run_name": _train_name(cfg, stage), "mlflow": mlflow, "fault": fault}
    if stage.kind == "dino":
        st.train_dino(cfg, folder / "model", **train_kw)
    elif stage.kind == "simclr":
        st.train_simclr(cfg, folder / "model", **train_kw)
    elif stage.kind == "finetune":
        labels = cfg.run_dir / f"round_{stage.round - 1}" / "cluster" / "labels.parquet"
        st.finetune(rcfg, labels, folder / "model", init=finetune_init(rcfg, stage.round), **train_kw)
    elif stage.kind == "lmft":
        source = _model_dir(cfg, f"round_{stage.round}/finetune")
        st.finetune(rcfg, source / "labels.parquet", folder / "model", init=source, large_margin=True, **train_kw)
    elif stage.kind == "extract":
        metrics = st.extract(cfg, _model_dir(cfg, stage.model), folder)
    elif stage.kind == "cluster":
        ccfg = round_config(cfg, stage.round + 1)
        metrics = st.cluster(ccfg, cfg.run_dir / f"round_{stage.round}" / "extract", folder)
        artifacts.append(folder / "clusters.json")
    elif stage.kind == "eval":
        cohort = _cohort(cfg, stage)
        per_list = st.evaluate_checkpoint(cfg, _model_dir(cfg, stage.model), plots_dir=folder, cohort=cohort)
        metrics = {"trials": per_list}
        write_json(folder / "metrics.json", per_list)
        artifacts.append(folder)
    if stage.kind in ("dino", "simclr", "finetune", "lmft"):
        metrics = _training_summary(folder / "model")
        artifacts.append(folder / "model" / "model.json")
    minutes = (time.time() - started) / 60.0
    flat = _flat_metrics(metrics)
    flat["minutes"] = minutes
    tracker.log_metrics(child, flat)
    for path in artifacts:
        tracker.log_artifact(child, path)
    if stage.kind == "eval":
        for name, m in metrics["trials"].items():
            tracker.log_metrics(parent, {f"{stage.model.replace('/', '.')}.{name}.eer": m["eer"]})
    tracker.end_run(child)
    entry = {"config": json.loads(json.dumps(config)), "metrics": metrics, "minutes": minutes, "finished": time.time()}
    write_json(folder / MARKER, entry)
    state.record(stage, entry)
    log.info("%s done in %.1f min %s", stage.id, minutes, _short(flat))


def _cohort(cfg: Config, stage: Stage):
    """Training embeddings of the evaluated model, for AS-norm (None when AS-norm is off)."""
    import numpy as np

    if cfg.eval.asnorm.top_n is None:
        return None
    from raysv.pseudo.embeddings import read_embeddings

    folder = cfg.run_dir / stage.model.split("/")[0] / "extract"
    if stage.model.endswith("/lmft") or not (folder / MARKER).is_file():
        from raysv import stages as st

        folder = cfg.run_dir / stage.folder / "cohort"
        if not (folder / "embeddings.parquet").is_file():
            st.extract(cfg, _model_dir(cfg, stage.model), folder)
    _, emb = read_embeddings(folder / "embeddings.parquet")
    rng = np.random.default_rng(cfg.eval.seed)
    take = min(cfg.eval.asnorm.cohort_size, len(emb))
    return emb[np.sort(rng.choice(len(emb), take, replace=False))]


def _training_summary(model_dir: Path) -> dict[str, Any]:
    from raysv.train.checkpoint import load_training_state

    history = load_training_state(model_dir).get("history", [])
    if not history:
        return {}
    last = history[-1]
    keep = ("loss", "accuracy", "dropped", "corrected", "epoch")
    summary = {k: last[k] for k in keep if k in last} | {"epochs": len(history)}
    peaks = [h["peak_rss_mb"] for h in history if "peak_rss_mb" in h]
    if peaks:
        summary["peak_rss_mb"] = max(peaks)
    return summary


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name.replace("/", ".")] = float(value)
    return out


def _short(flat: dict[str, float]) -> str:
    keys = [k for k in flat if k.endswith(("eer", "nmi", "loss", "num_clusters"))]
    return " ".join(f"{k}={flat[k]:.4g}" for k in keys[:6])


# ---------------------------------------------------------------- results


def summarise(cfg: Config, stages: list[Stage], state: RunState) -> dict[str, Any]:
    """One row per model: its EER per trial list, the NMI of clustering its embeddings, minutes."""
    rows: dict[str, dict[str, Any]] = {}
    for stage in stages:
        entry = state.done(stage)
        if entry is None:
            continue
        row = rows.setdefault(stage.model, {"name": stage.model, "minutes": 0.0})
        row["minutes"] += entry["minutes"]
        m = entry["metrics"]
        if stage.kind == "eval":
            tests = {k: v for k, v in m["trials"].items() if k != "dev"}
            row["trials"] = {
                name: {k: v[k] for k in ("eer", "min_dcf_0.01", "min_dcf_0.05")} for name, v in m["trials"].items()
            }
            first = next(iter(tests.values()), None) or next(iter(m["trials"].values()))
            row.update({k: first[k] for k in ("eer", "min_dcf_0.01", "min_dcf_0.05")})
        if stage.kind == "cluster":
            row["nmi"] = m.get("nmi")
            row["num_clusters"] = m.get("num_clusters")
    return {"run": cfg.name, "stages": list(rows.values())}


def format_table(results: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return f"{100 * v:6.2f}" if isinstance(v, (int, float)) else "     -"

    def num(v: Any) -> str:
        return f"{v:6.3f}" if isinstance(v, (int, float)) else "     -"

    lines = [f"{'stage':<22} {'EER %':>6} {'DCF.01':>6} {'NMI':>6} {'min':>6}"]
    for row in results["stages"]:
        lines.append(
            f"{row['name']:<22} {pct(row.get('eer'))} {num(row.get('min_dcf_0.01'))} "
            f"{num(row.get('nmi'))} {row['minutes']:6.1f}"
        )
    return "\n".join(lines)


def _log_summary(cfg: Config, tracker, parent: str, results: dict[str, Any], finished: bool) -> None:
    from raysv.evaluation.plots import plot_rounds

    rows = [r for r in results["stages"] if r.get("eer") is not None]
    if rows:
        path = plot_rounds(rows, cfg.run_dir / "rounds.png")
        tracker.log_artifact(parent, path)
    tracker.log_artifact(parent, cfg.run_dir / "results.json")
    if finished and rows:
        final = _model_dir(cfg, rows[-1]["name"])
        tracker.log_artifact(parent, final, "final_model")
        tracker.log_metrics(parent, {"final.eer": rows[-1]["eer"]})
    tracker.end_run(parent, status="FINISHED")


def format_status(run_dir: str | Path) -> str:
    """What a run has done: each stage, complete or not, its key figures and time."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a raysv run directory (no config.json)")
    from raysv.config import config_from_dict

    cfg = config_from_dict(json.loads(config_path.read_text()))
    state = RunState(run_dir)
    lines = [f"run {cfg.name} ({run_dir})"]
    for stage in plan(cfg):
        entry = state.done(stage)
        if entry is None:
            started = (run_dir / stage.folder).exists()
            lines.append(f"  {stage.id:<22} {'started' if started else 'pending'}")
            continue
        flat = _flat_metrics(entry["metrics"])
        lines.append(f"  {stage.id:<22} done {entry['minutes']:6.1f} min  {_short(flat)}")
    return "\n".join(lines)
