"""The rounds: which stage runs next, resume, the results table.

Stages, in order (R = ``rounds.count``)::

    round_0/dino → [baseline/simclr → baseline/simclr_eval] → round_0/eval → round_0/extract → round_0/cluster
    round_r/finetune → round_r/eval → round_r/extract → round_r/cluster   (r = 1 .. R-1)
    round_R/finetune → round_R/eval → round_R/lmft → round_R/lmft_eval

A stage writes only into its folder of the run directory (:class:`RunLayout`); it is
complete when its marker ``_complete.json`` is written, last, and then recorded in
``state.json``. Re-running the same command skips complete stages and resumes the first
incomplete one (training resumes from its last epoch checkpoint). What each kind of
stage does is in ``raysv.stages``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from raysv.artifacts.jsonio import write_json
from raysv.artifacts.layout import RunLayout
from raysv.artifacts.lock import RunLock
from raysv.artifacts.shards import manifest_columns
from raysv.data.trials import read_trials, usable_trials
from raysv.config import ConfigError, differences
from raysv.errors import InputError
from raysv.evaluation.seeds import self_supervised
from raysv.run_config import Config, config_from_dict, round_config
from raysv.runtime import ensure_ray, storage_path
from raysv.stages import KINDS, Stage, StageContext
from raysv.stages.base import train_run_name, training_summary
from raysv.stages.evaluate import trial_lists

log = logging.getLogger("raysv")


def plan(cfg: Config) -> list[Stage]:
    """Every stage of the run, in order, each with the round whose settings it runs with."""
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
            stages.append(Stage(model, "finetune", r, model, settings_round=r))
        after = [] if last else [Stage(f"round_{r}/extract", "extract", r, model, settings_round=r),
                                 # labels for round r + 1 are made with round r + 1's clustering settings
                                 Stage(f"round_{r}/cluster", "cluster", r, model, settings_round=r + 1)]
        evaluate = [Stage(f"round_{r}/eval", "eval", r, model, settings_round=r)]
        stages += (after + evaluate) if asnorm else (evaluate + after)
    r = cfg.rounds.count
    if cfg.lmft.enabled:
        stages.append(Stage(f"round_{r}/lmft", "lmft", r, f"round_{r}/lmft", settings_round=r,
                            source=f"round_{r}/finetune"))
        stages.append(Stage(f"round_{r}/lmft_eval", "eval", r, f"round_{r}/lmft", settings_round=r))
    if cfg.reference.supervised:  # the same model on the true speakers, with the last round's settings
        stages.append(Stage("reference/finetune", "supervised", r, "reference/finetune", settings_round=r))
        stages.append(Stage("reference/eval", "eval", r, "reference/finetune", settings_round=r))
        if cfg.lmft.enabled:
            stages.append(Stage("reference/lmft", "supervised_lmft", r, "reference/lmft", settings_round=r,
                                source="reference/finetune"))
            stages.append(Stage("reference/lmft_eval", "eval", r, "reference/lmft", settings_round=r))
    return stages


def stage_settings(cfg: Config, stage: Stage) -> Config:
    """The config a stage runs with: its round's overrides applied, then its kind's own changes."""
    return KINDS[stage.kind].settings(round_config(cfg, stage.settings_round))


def stage_config(cfg: Config, stage: Stage) -> dict[str, Any]:
    """The part of the config a stage's output depends on (its round's settings): a change here invalidates it."""
    return json.loads(json.dumps(KINDS[stage.kind].config_slice(stage_settings(cfg, stage))))


class RunState:
    """``state.json``: completed stages with their config, figures and time; the MLflow parent run."""

    def __init__(self, run_dir: Path):
        self.path = RunLayout(Path(run_dir)).state
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


class ConfigChanged(InputError):
    """A completed stage's config differs from the current one."""


def _changes(cfg: Config, stage: Stage, entry: dict[str, Any]) -> list[str]:
    """How ``cfg`` differs from the config a completed stage ran with (a setting added since, at its default, is none)."""
    return differences(entry["config"], stage_config(cfg, stage), stage_config(Config(), stage))


def check_unchanged(cfg: Config, stages: list[Stage], state: RunState) -> None:
    """Refuse to continue a run whose completed stages ran with other settings, naming the changed keys."""
    for stage in stages:
        entry = state.done(stage)
        if entry is None:
            continue
        changes = _changes(cfg, stage, entry)
        if changes:
            raise ConfigChanged(
                f"stage {stage.id} is complete but its config changed:\n  " + "\n  ".join(changes)
                + f"\nrun again with --restart-from {stage.id} to redo it and everything after it"
            )


def completed_stage_changes(cfg: Config, other: Config) -> list[str]:
    """Completed stages of ``cfg``'s run whose config ``other`` would change (they would need a restart)."""
    state = RunState(cfg.run_dir)
    return [s.id for s in plan(cfg) if state.done(s) is not None and _changes(other, s, state.done(s))]


def run_pipeline(
    cfg: Config,
    until: str | None = None,
    restart_from: str | None = None,
    fault: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or continue) every stage; return the results table also written to ``results.json``.

    The run directory is held for the run's length (``run.lock``: a second ``raysv run`` on it
    is refused, naming this one's host and pid), and everything logged goes to ``run.log``.
    """
    layout = cfg.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    with RunLock(layout.lock), _log_to(layout.log):
        return _run(cfg, until, restart_from, fault)


@contextlib.contextmanager
def _log_to(path: Path):
    """Everything raysv and the libraries log, at DEBUG and with its source, appended to ``path``."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    raysv_logger = logging.getLogger("raysv")
    previous = raysv_logger.level
    console = [h for h in root.handlers if h.level == logging.NOTSET] if root.getEffectiveLevel() > logging.DEBUG else []
    for h in console:  # the console keeps its level: raysv's debug lines go to the file only
        h.setLevel(root.getEffectiveLevel())
    root.addHandler(handler)
    raysv_logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        raysv_logger.setLevel(previous)
        for h in console:
            h.setLevel(logging.NOTSET)
        handler.close()


def _run(cfg: Config, until: str | None, restart_from: str | None, fault: dict[str, Any] | None) -> dict[str, Any]:
    from raysv.tracking import Tracker

    layout = cfg.layout
    stages = plan(cfg)
    ids = [s.id for s in stages]
    for name, value in (("--until", until), ("--restart-from", restart_from)):
        if value is not None and value not in ids:
            raise ValueError(f"{name} {value!r}: no such stage; stages are {', '.join(ids)}")
    state = RunState(layout.root)
    if restart_from is not None:
        for stage in stages[ids.index(restart_from):]:
            _reset_stage(cfg, stage, state)
    check_unchanged(cfg, stages, state)
    if any(state.done(s) is None for s in stages if s.kind == "eval"):
        check_trial_lists(cfg)
    if cfg.reference.supervised and "speaker" not in manifest_columns(cfg.data.shards):
        raise ConfigError(f"reference.supervised: the shards in {cfg.data.shards} name no speakers; prepare them "
                          "without --no-speakers, or turn the supervised reference off")
    write_json(layout.config, cfg.to_dict())

    tracker = Tracker(cfg.mlflow, cfg.runs)
    parent = tracker.start_run(cfg.name, {"raysv.run": cfg.name, "raysv.kind": "pipeline"}, params=cfg.to_dict())
    state.data["mlflow_parent"] = parent
    state.save()
    ensure_ray(cfg.ray)
    try:
        for stage in stages:
            if state.done(stage) is None:
                _run_stage(cfg, stage, state, tracker, parent, fault)
            if stage.id == until:
                log.info("stopping after %s (--until)", until)
                break
        results = summarise(cfg, stages, state)
        write_json(layout.results, results)
        _log_summary(cfg, tracker, parent, results, finished=until is None or until == ids[-1])
    except BaseException:
        tracker.end_run(parent, status="FAILED")
        raise
    print(format_table(results))
    print(f"\nMLflow: mlflow ui --backend-store-uri {tracker.uri}")
    return results


def check_trial_lists(cfg: Config) -> None:
    """Every trial list the evaluation stages will read, parsed and its files checked, before any
    training: a missing list or file would otherwise surface after the first stage, hours in."""
    lists = trial_lists(cfg)
    started, files = time.time(), 0
    for t in lists.values():
        files += len(usable_trials(read_trials(t.path), t.audio_root, cfg.eval.skip_bad)[1])
    log.info("trial lists checked: %s (%d files, %.0f s)", ", ".join(lists), files, time.time() - started)


def _reset_stage(cfg: Config, stage: Stage, state: RunState) -> None:
    """Forget a stage and delete its outputs (and its Ray Train run) so it starts afresh."""
    state.forget(stage)
    folder = cfg.layout.stage(stage.folder)
    if folder.exists():
        shutil.rmtree(folder)
    storage = storage_path(cfg.ray, cfg.run_dir)
    if "://" not in storage:
        shutil.rmtree(Path(storage) / train_run_name(cfg, stage.id), ignore_errors=True)


def _run_stage(cfg: Config, stage: Stage, state: RunState, tracker, parent: str, fault: dict | None) -> None:
    kind = KINDS[stage.kind]
    layout = cfg.layout
    folder = layout.stage(stage.folder)
    folder.mkdir(parents=True, exist_ok=True)
    layout.marker(stage.id).unlink(missing_ok=True)
    config = stage_config(cfg, stage)
    child = tracker.start_run(stage.id, {"raysv.run": cfg.name, "raysv.stage": stage.id}, parent=parent, params=config)
    log.info("=== %s ===", stage.id)
    started = time.time()
    ctx = StageContext(stage_settings(cfg, stage), stage, layout,
                       mlflow={"tracking_uri": tracker.uri, "run_id": child}, fault=fault)
    result = kind.run(ctx)
    metrics = result.metrics
    artifacts = list(result.artifacts)
    if kind.trains:
        metrics = training_summary(layout.model(stage.id))
        artifacts.append(layout.model(stage.id) / "model.json")
    minutes = (time.time() - started) / 60.0
    flat = _flat_metrics(metrics)
    flat["minutes"] = minutes
    tracker.log_metrics(child, flat)
    for path in artifacts:
        tracker.log_artifact(child, path)
    if result.parent_metrics:
        tracker.log_metrics(parent, result.parent_metrics)
    tracker.end_run(child)
    entry = {"config": config, "metrics": metrics, "minutes": minutes, "finished": time.time()}
    write_json(layout.marker(stage.id), entry)
    state.record(stage, entry)
    log.info("%s done in %.1f min %s", stage.id, minutes, _short(flat))


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
    """One row per model: its EER per trial list, the NMI of clustering its embeddings, minutes;
    with the supervised reference, the ratio of the last self-supervised EER to its EER."""
    rows: dict[str, dict[str, Any]] = {}
    for stage in stages:
        entry = state.done(stage)
        if entry is None:
            continue
        row = rows.setdefault(stage.model, {"name": stage.model, "minutes": 0.0})
        row["minutes"] += entry["minutes"]
        KINDS[stage.kind].summarise(row, entry["metrics"])
    results: dict[str, Any] = {"run": cfg.name, "stages": list(rows.values())}
    evaluated = [r for r in rows.values() if r.get("eer") is not None]
    ssl = [r for r in evaluated if self_supervised(r["name"])]
    supervised = [r for r in evaluated if r["name"].startswith("reference/")]
    if ssl and supervised and supervised[-1]["eer"] > 0:
        results["ratio"] = {"self_supervised": ssl[-1]["name"], "supervised": supervised[-1]["name"],
                            "eer_ratio": ssl[-1]["eer"] / supervised[-1]["eer"]}
    _add_intervals(cfg, stages, ssl, results.get("ratio"))
    return results


def _add_intervals(cfg: Config, stages: list[Stage], ssl: list[dict[str, Any]], ratio: dict[str, Any] | None) -> None:
    """Speaker-level paired bootstrap intervals on the first test list (:mod:`raysv.evaluation.compare`): each
    self-supervised model's EER change against the one before it (``row["change"]``), and the ratio's."""
    from raysv.evaluation.compare import SCORES_FILE, compare_scores

    tests = list(cfg.data.trials)
    if not tests:
        return
    scores = {s.model: cfg.layout.stage(s.id) / tests[0] / SCORES_FILE for s in stages if s.kind == "eval"}

    def compare(a: str, b: str) -> dict[str, Any] | None:
        if not (a in scores and b in scores and scores[a].is_file() and scores[b].is_file()):
            return None
        try:
            return compare_scores(scores[a], scores[b], resamples=None)
        except ValueError as err:  # e.g. a list too small to resample
            log.debug("no interval for %s against %s: %s", b, a, err)
            return None

    for before, row in zip(ssl, ssl[1:]):
        found = compare(before["name"], row["name"])
        if found:
            row["change"] = {"vs": before["name"], "eer": found["difference"], "low": found["low"],
                             "high": found["high"], "level": found["level"]}
    if ratio:
        found = compare(ratio["supervised"], ratio["self_supervised"])
        if found:
            ratio.update({"low": found["ratio_low"], "high": found["ratio_high"], "level": found["level"]})


def format_table(results: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return f"{100 * v:6.2f}" if isinstance(v, (int, float)) else "     -"

    def num(v: Any) -> str:
        return f"{v:6.3f}" if isinstance(v, (int, float)) else "     -"

    def change(row: dict[str, Any]) -> str:
        c = row.get("change")
        return "" if not c else f"  {100 * c['eer']:+.2f} ({100 * c['low']:+.2f} to {100 * c['high']:+.2f})"

    asnorm = any(row.get("eer_asnorm") is not None for row in results["stages"])
    head = f"{'stage':<22} {'EER %':>6}" + (f" {'ASnorm':>6}" if asnorm else "")
    head += f" {'DCF.01':>6} {'NMI':>6} {'min':>6}"
    if any(row.get("change") for row in results["stages"]):
        head += "  EER change from the model before, points (90 % interval)"
    lines = [head]
    for row in results["stages"]:
        line = f"{row['name']:<22} {pct(row.get('eer'))}" + (f" {pct(row.get('eer_asnorm'))}" if asnorm else "")
        lines.append(line + f" {num(row.get('min_dcf_0.01'))} {num(row.get('nmi'))} {row['minutes']:6.1f}{change(row)}")
    ratio = results.get("ratio")
    if ratio:
        interval = f" (90 % interval {ratio['low']:.2f} to {ratio['high']:.2f})" if "low" in ratio else ""
        lines.append(f"EER {ratio['self_supervised']} / {ratio['supervised']} = {ratio['eer_ratio']:.2f}{interval}")
    return "\n".join(lines)


def _log_summary(cfg: Config, tracker, parent: str, results: dict[str, Any], finished: bool) -> None:
    from raysv.evaluation.plots import plot_rounds

    rows = [r for r in results["stages"] if r.get("eer") is not None]
    if rows:
        path = plot_rounds(rows, cfg.layout.rounds_plot)
        tracker.log_artifact(parent, path)
    tracker.log_artifact(parent, cfg.layout.results)
    ssl = [r for r in rows if self_supervised(r["name"])]
    if finished and ssl:
        tracker.log_artifact(parent, cfg.layout.model(ssl[-1]["name"]), "final_model")
        tracker.log_metrics(parent, {"final.eer": ssl[-1]["eer"]})
    ratio = results.get("ratio")
    if ratio:
        tracker.log_metrics(parent, {"final.eer_ratio_to_supervised": ratio["eer_ratio"],
                                     **({"final.eer_ratio_low": ratio["low"], "final.eer_ratio_high": ratio["high"]}
                                        if "low" in ratio else {})})
    tracker.end_run(parent, status="FINISHED")


def format_status(run_dir: str | Path) -> str:
    """What a run has done: each stage, complete or not, its key figures and time."""
    layout = RunLayout(Path(run_dir))
    if not layout.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a raysv run directory (no config.json)")
    cfg = config_from_dict(json.loads(layout.config.read_text()))
    state = RunState(layout.root)
    lines = [f"run {cfg.name} ({run_dir})"]
    for stage in plan(cfg):
        entry = state.done(stage)
        if entry is None:
            started = layout.stage(stage.folder).exists()
            lines.append(f"  {stage.id:<22} {'started' if started else 'pending'}")
            continue
        flat = _flat_metrics(entry["metrics"])
        lines.append(f"  {stage.id:<22} done {entry['minutes']:6.1f} min  {_short(flat)}")
    return "\n".join(lines)


__all__ = ["ConfigChanged", "RunState", "check_unchanged", "completed_stage_changes", "format_status",
           "format_table", "plan", "run_pipeline", "stage_config", "summarise"]
