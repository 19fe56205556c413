"""The same run repeated with other seeds: each stage's mean EER, its spread, and whether the rounds hold.

A run's EERs move by a point or more with the seed alone (the encoder's first weights, the crops,
the k-means start), so whether round r beats round r - 1 is a question about several runs of one
config. :func:`seed_spread` reads their ``results.json`` (what ``raysv run`` writes) and gives, per
stage, the mean and standard deviation of the EER over the runs, the change from the
self-supervised stage before it (paired: the same run's two stages), and whether the stage holds:
its mean is no more than the previous stage's mean plus that stage's standard deviation. The ratio
of the last self-supervised stage to the supervised reference is given the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from raysv.errors import InputError

RESULTS_FILE = "results.json"
NOT_SELF_SUPERVISED = ("reference/", "baseline/")


def read_results(path: str | Path) -> dict[str, Any]:
    """A run's ``results.json`` (the file, or the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist (raysv run writes {RESULTS_FILE} in the run folder when it ends)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err})") from err
    stages = results.get("stages") if isinstance(results, dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) and "name" in s for s in stages):
        raise InputError(f"{path}: expected a 'stages' list of rows with a 'name', as raysv run writes")
    results["path"] = str(path)
    return results


def _eer(row: dict[str, Any], trials: str | None, path: str) -> float | None:
    """The row's EER on ``trials`` (None: the run's first test list), or None for a stage without one."""
    if trials is None:
        return row.get("eer")
    lists = row.get("trials") or {}
    if trials not in lists:
        if row.get("eer") is None:
            return None
        raise InputError(f"{path}: stage {row['name']} has no trial list {trials!r} "
                         f"(it has {', '.join(sorted(lists)) or 'none'})")
    return lists[trials].get("eer")


def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1), smallest and largest of ``values``."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def seed_spread(runs: list[str | Path], trials: str | None = None) -> dict[str, Any]:
    """Per stage the EER over ``runs`` (results.json files or run folders of one config, other seeds).

    Stages are taken in the first run's order; a stage some runs lack is named under ``missing``
    and left out. ``trials`` picks a trial list by name (default: each run's first test list).
    """
    if len(runs) < 2:
        raise InputError(f"give at least two runs (a spread needs two), got {len(runs)}")
    results = [read_results(r) for r in runs]
    eers: list[dict[str, float]] = []
    for res in results:
        per_stage = {}
        for row in res["stages"]:
            eer = _eer(row, trials, res["path"])
            if eer is not None:
                per_stage[row["name"]] = float(eer)
        eers.append(per_stage)
    order = [row["name"] for row in results[0]["stages"] if row["name"] in eers[0]]
    names = [n for n in order if all(n in e for e in eers)]
    missing = sorted({n for e in eers for n in e} - set(names))
    if not names:
        raise InputError("the runs have no evaluated stage in common")
    stages = []
    previous: dict[str, Any] | None = None
    for name in names:
        values = [e[name] for e in eers]
        stage: dict[str, Any] = {"name": name, "eer": values, **_mean_sd(values)}
        if not name.startswith(NOT_SELF_SUPERVISED):
            if previous is not None:
                diffs = [v - p for v, p in zip(values, previous["eer"])]
                stage["change"] = {"vs": previous["name"], **_mean_sd(diffs)}
                stage["holds"] = stage["mean"] <= previous["mean"] + previous["sd"]
            previous = stage
        stages.append(stage)
    out: dict[str, Any] = {"runs": [r["path"] for r in results], "trials": trials, "stages": stages,
                           "missing": missing}
    ssl = [s for s in stages if not s["name"].startswith(NOT_SELF_SUPERVISED)]
    supervised = [s for s in stages if s["name"].startswith("reference/")]
    if ssl and supervised and all(v > 0 for v in supervised[-1]["eer"]):
        ratios = [a / b for a, b in zip(ssl[-1]["eer"], supervised[-1]["eer"])]
        out["ratio"] = {"self_supervised": ssl[-1]["name"], "supervised": supervised[-1]["name"],
                        "values": ratios, **_mean_sd(ratios)}
    return out


def format_spread(spread: dict[str, Any]) -> str:
    """The table a person reads: EER mean, spread and range per stage; the change and whether it holds."""
    pct = 100.0
    lines = [f"{len(spread['runs'])} runs, trial list: {spread['trials'] or 'the first test list'}",
             f"{'stage':<22} {'EER % mean':>10} {'sd':>5} {'min':>6} {'max':>6}  {'change':>6} {'sd':>5}"
             "  (from the stage before; no worse beyond one sd?)"]
    for s in spread["stages"]:
        line = f"{s['name']:<22} {pct * s['mean']:10.2f} {pct * s['sd']:5.2f} {pct * s['min']:6.2f} {pct * s['max']:6.2f}"
        if "change" in s:
            c = s["change"]
            line += f"  {pct * c['mean']:+6.2f} {pct * c['sd']:5.2f}  {'yes' if s['holds'] else 'NO'}"
        lines.append(line)
    if spread["missing"]:
        lines.append(f"left out (not in every run): {', '.join(spread['missing'])}")
    ratio = spread.get("ratio")
    if ratio:
        lines.append(f"EER {ratio['self_supervised']} / {ratio['supervised']} = {ratio['mean']:.2f} ± {ratio['sd']:.2f}"
                     f" ({ratio['min']:.2f} to {ratio['max']:.2f})")
    return "\n".join(lines)
