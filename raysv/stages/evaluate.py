"""Scoring a model on every trial list of the config (and the dev list), with its decision threshold."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from raysv.artifacts.checkpoint import read_model_json, write_model_json
from raysv.artifacts.embeddings import read_embeddings
from raysv.artifacts.jsonio import write_json
from raysv.artifacts.layout import MARKER
from raysv.artifacts.shards import shard_utt_index
from raysv.config import to_dict
from raysv.data.trials import read_trials, usable_trials
from raysv.embedding.core import fused_cohort
from raysv.embedding.pool import EMBEDDINGS_FILE, embed_files
from raysv.evaluation.evaluate import evaluate_trials, format_metrics
from raysv.evaluation.scoring import score_trials, threshold_at_eer
from raysv.run_config import Config
from raysv.runtime import ensure_ray
from raysv.stages.base import StageContext, StageKind, StageResult
from raysv.stages.extract import extract

log = logging.getLogger("raysv")

METRICS = ("eer", "min_dcf_0.01", "min_dcf_0.05", "eer_asnorm", "min_dcf_0.01_asnorm", "min_dcf_0.05_asnorm")


def trial_lists(cfg: Config) -> dict[str, Any]:
    """The trial lists a model is scored on, by their config keys: the dev list (when set) first."""
    dev = {} if cfg.data.dev_trials is None else {"dev": cfg.data.dev_trials}
    return {**dev, **cfg.data.trials}


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | Path,
    *,
    plots_dir: str | Path | None = None,
    cohort: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Every trial list of the config (and the dev list), scored with the checkpoint.

    Raw scores are always measured; with a ``cohort`` (AS-norm on) the normalised ones go
    beside them. The decision threshold, of the scoring ``verify`` uses (AS-norm when on,
    else raw), is set on the dev list when there is one, otherwise on the first test list,
    and stored in the checkpoint's ``model.json`` with the protocol it belongs to.
    """
    lists = trial_lists(cfg)
    if not lists:
        raise ValueError("data.trials is empty: name at least one trial list to evaluate on")
    protocol = cfg.eval.protocol()
    top_n = cfg.eval.asnorm.top_n if cohort is not None else None
    scoring_cohort = None if cohort is None else (cohort if protocol.cosine else fused_cohort(cohort))
    # Every file of every list checked first, then one pass of the actor pool embeds them all.
    checked = {name: usable_trials(read_trials(t.path), t.audio_root, cfg.eval.skip_bad) for name, t in lists.items()}
    files = {name: per_list[1] for name, per_list in checked.items()}
    ensure_ray(cfg.ray)
    started = time.perf_counter()
    by_path = embed_files(checkpoint, {str(p): p for per_list in files.values() for p in per_list.values()},
                          protocol=protocol)
    embed_seconds = round(time.perf_counter() - started, 3)
    results: dict[str, dict[str, Any]] = {}
    threshold = None
    for name, trial_list in lists.items():
        plots = Path(plots_dir) / name if plots_dir else None
        metrics = evaluate_trials(
            checked[name][0],
            trial_list.audio_root,
            checkpoint=checkpoint,
            protocol=protocol,
            cohort=scoring_cohort,
            top_n=top_n,
            plots_dir=plots,
            threshold=threshold,
            embeddings={utt: by_path[str(p)] for utt, p in files[name].items()},
        )
        metrics["embed_seconds"] = embed_seconds  # of the shared pass over all lists
        log.info("  %s", format_metrics(name, metrics))
        if threshold is None:
            threshold = float(metrics["threshold_asnorm" if cohort is not None else "threshold"])
        results[name] = metrics
    meta = read_model_json(checkpoint)
    meta["threshold"] = threshold
    meta["threshold_from"] = next(iter(lists))
    meta["threshold_scoring"] = "asnorm" if cohort is not None else "raw"
    meta["embedding_threshold"] = _whole_file_threshold(protocol, checked[next(iter(lists))][0], files[next(iter(lists))],
                                                        by_path)
    meta["eval"] = dataclasses.asdict(protocol)
    meta.pop("cohort", None)
    meta.pop("asnorm_top_n", None)
    if cohort is not None and top_n:
        np.save(Path(checkpoint) / "cohort.npy", cohort.astype(np.float32))
        meta["cohort"] = "cohort.npy"
        meta["asnorm_top_n"] = int(top_n)
    write_model_json(checkpoint, meta)
    return results


def _whole_file_threshold(protocol, trials, files, by_path) -> float | None:
    """The EER threshold of plain whole-file cosines (enrolment and identification score so), when the
    trial vectors hold the whole file's embedding: without crops, or as the first half of a fused vector."""
    if protocol.crops > 0 and protocol.fusion != "score":
        return None
    vectors = {u: by_path[str(p)] for u, p in files.items()}
    if protocol.crops > 0:
        vectors = {u: v[: len(v) // 2] for u, v in vectors.items()}
    scores = score_trials(vectors, trials.enroll, trials.test)
    return float(threshold_at_eer(scores, trials.labels.astype(np.int64)))


def _rows(path: Path, utt_indices: np.ndarray) -> np.ndarray | None:
    """The embeddings of ``utt_indices`` (sorted) from a file, or None when it is absent or lacks one of them."""
    if not path.is_file():
        return None
    index, emb = read_embeddings(path)
    at = np.minimum(np.searchsorted(index, utt_indices), len(index) - 1)
    return emb[at] if np.array_equal(index[at], utt_indices) else None


class EvalStage(StageKind):
    name = "eval"

    def config_slice(self, cfg: Config) -> dict[str, Any]:
        return {"eval": to_dict(cfg.eval), "trials": to_dict(cfg.data.trials), "dev_trials": to_dict(cfg.data.dev_trials)}

    def run(self, ctx: StageContext) -> StageResult:
        model = ctx.layout.model(ctx.stage.model)
        per_list = evaluate_checkpoint(ctx.cfg, model, plots_dir=ctx.folder, cohort=self._cohort(ctx))
        write_json(ctx.folder / "metrics.json", per_list)
        tag = ctx.stage.model.replace("/", ".")
        return StageResult(metrics={"trials": per_list}, artifacts=[ctx.folder],
                           parent_metrics={f"{tag}.{name}.eer": m["eer"] for name, m in per_list.items()})

    @staticmethod
    def _cohort(ctx: StageContext) -> np.ndarray | None:
        """A seeded sample of ``cohort_size`` training embeddings of the evaluated model, for AS-norm
        (None when AS-norm is off): the round's extraction when there is one, else only the sample is embedded."""
        cfg = ctx.cfg
        if cfg.eval.asnorm.top_n is None:
            return None
        stage = ctx.stage
        every = np.sort(shard_utt_index(cfg.data.shards))
        rng = np.random.default_rng(cfg.eval.seed)
        chosen = every[np.sort(rng.choice(len(every), min(cfg.eval.asnorm.cohort_size, len(every)), replace=False))]
        folder = ctx.layout.stage(f"{stage.model.split('/')[0]}/extract")
        if stage.model.endswith("/lmft") or not (folder / MARKER).is_file():
            folder = ctx.layout.cohort(stage.id)
            rows = _rows(folder / EMBEDDINGS_FILE, chosen)
            if rows is not None:
                return rows
            extract(cfg, ctx.layout.model(stage.model), folder, utt_indices=chosen)
        rows = _rows(folder / EMBEDDINGS_FILE, chosen)
        if rows is None:
            raise RuntimeError(f"{folder / EMBEDDINGS_FILE} lacks AS-norm cohort utterances")
        return rows

    def summarise(self, row: dict[str, Any], metrics: dict[str, Any]) -> None:
        trials = metrics["trials"]
        tests = {k: v for k, v in trials.items() if k != "dev"}
        row["trials"] = {name: {k: v[k] for k in METRICS if k in v} for name, v in trials.items()}
        first = next(iter(tests.values()), None) or next(iter(trials.values()))
        row.update({k: first[k] for k in METRICS if k in first})
