"""The same run repeated with other seeds: each stage's mean EER, its spread, and whether the rounds hold.

A run's EERs move by a point or more with the seed alone (the encoder's first weights, the crops,
the k-means start), so whether round r beats round r - 1 is a question about several runs of one
config. :func:`seed_spread` reads their ``results.json`` (what ``raysv run`` writes) and gives, per
stage, the mean and standard deviation of the EER over the runs and the change from the
self-supervised stage before it, paired (each run's two stages). A stage *holds* when its mean is
at most the previous stage's mean plus the previous stage's standard deviation: no worse beyond
the seed spread. That rule compares means; the paired change's mean and sd show how consistently a
stage moves from run to run. The ratio of the last self-supervised stage to the supervised
reference is given the same way.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from raysv.artifacts.layout import RunLayout
from raysv.errors import InputError

NOT_SELF_SUPERVISED = ("reference/", "baseline/")
"""Result rows that are not a stage of the self-supervised chain: the supervised reference and baselines."""
DEV = "dev"


def self_supervised(name: str) -> bool:
    """Whether the result row ``name`` is a model of the self-supervised chain (DINO, a round, large margin)."""
    return not name.startswith(NOT_SELF_SUPERVISED)


def read_results(path: str | Path) -> dict[str, Any]:
    """A run's ``results.json`` (the file, or the run folder holding it), checked row by row."""
    path = Path(path)
    if path.is_dir():
        path = RunLayout(path).results
    if not path.is_file():
        raise InputError(f"{path} does not exist (raysv run writes {path.name} in the run folder when it ends)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not JSON ({err})") from err
    stages = results.get("stages") if isinstance(results, dict) else None
    if not isinstance(stages, list):
        raise InputError(f"{path}: expected a 'stages' list, as raysv run writes")
    for row in stages:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise InputError(f"{path}: a stage row without a name: {row!r}")
        eers = [row.get("eer"), *(v.get("eer") for v in (row.get("trials") or {}).values() if isinstance(v, dict))]
        if any(e is not None and (isinstance(e, bool) or not isinstance(e, (int, float))) for e in eers):
            raise InputError(f"{path}: stage {row['name']} has an EER that is not a number")
    results["path"] = str(path)
    return results


def first_test_list(results: dict[str, Any]) -> str | None:
    """The trial list a run's rows report at their top level: its first test list, else ``dev``."""
    for row in results["stages"]:
        lists = list(row.get("trials") or {})
        if lists:
            return next((name for name in lists if name != DEV), lists[0])
    return None


def _eers(results: dict[str, Any], trials: str) -> dict[str, float]:
    """EER on ``trials`` of every stage of a run that was evaluated on it."""
    out = {}
    for row in results["stages"]:
        lists = row.get("trials") or {}
        if trials in lists and lists[trials].get("eer") is not None:
            out[row["name"]] = float(lists[trials]["eer"])
        elif row.get("eer") is not None:
            raise InputError(f"{results['path']}: stage {row['name']} has no trial list {trials!r} "
                             f"(it has {', '.join(sorted(lists)) or 'none'})")
    return out


def _mean_sd(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (n - 1), smallest and largest of ``values``."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values), "min": min(values), "max": max(values)}


def seed_spread(runs: list[str | Path], trials: str | None = None) -> dict[str, Any]:
    """Per stage the EER over ``runs`` (results.json files or run folders of one config, other seeds).

    ``trials`` picks a trial list by name; by default each run's first test list, which must be the
    same list in every run. Stages are taken in the first run's order; a stage some runs lack is
    named under ``missing`` and left out.
    """
    if len(runs) < 2:
        raise InputError(f"give at least two runs (a spread needs two), got {len(runs)}")
    results = [read_results(r) for r in runs]
    seen: dict[Path, str] = {}
    for res, given in zip(results, runs):
        real = Path(res["path"]).resolve()
        if real in seen:
            raise InputError(f"{given} is the same run as {seen[real]}: give each run once")
        seen[real] = str(given)
    if trials is None:
        firsts = {res["path"]: first_test_list(res) for res in results}
        if len(set(firsts.values())) > 1:
            raise InputError("the runs report different trial lists first ("
                             + "; ".join(f"{p}: {t}" for p, t in firsts.items()) + "): choose one with --trials")
        trials = next(iter(firsts.values()))
        if trials is None:
            raise InputError(f"{results[0]['path']}: no stage was evaluated on a trial list")
    eers = [_eers(res, trials) for res in results]
    names = [row["name"] for row in results[0]["stages"] if all(row["name"] in e for e in eers)]
    missing = sorted({n for e in eers for n in e} - set(names))
    if not names:
        raise InputError("the runs have no evaluated stage in common: "
                         + "; ".join(f"{res['path']}: {', '.join(e) or 'none'}" for res, e in zip(results, eers)))
    stages = []
    previous: dict[str, Any] | None = None
    for name in names:
        values = [e[name] for e in eers]
        stage: dict[str, Any] = {"name": name, "values": values, **_mean_sd(values)}
        if self_supervised(name):
            if previous is not None:
                diffs = [v - p for v, p in zip(values, previous["values"])]
                stage["change"] = {"vs": previous["name"], **_mean_sd(diffs)}
                stage["holds"] = stage["mean"] <= previous["mean"] + previous["sd"]
            previous = stage
        stages.append(stage)
    out: dict[str, Any] = {"runs": [r["path"] for r in results], "trials": trials, "stages": stages,
                           "missing": missing, "notes": []}
    ssl = [s for s in stages if self_supervised(s["name"])]
    supervised = [s for s in stages if s["name"].startswith("reference/")]
    if ssl and supervised:
        pair = (ssl[-1]["name"], supervised[-1]["name"])
        if all(v > 0 for v in supervised[-1]["values"]):
            ratios = [a / b for a, b in zip(ssl[-1]["values"], supervised[-1]["values"])]
            out["ratio"] = {"self_supervised": pair[0], "supervised": pair[1], "values": ratios, **_mean_sd(ratios)}
        else:
            out["notes"].append(f"no ratio: {pair[1]} has an EER of 0 in some run")
        for res in results:
            own = res.get("ratio") or {}
            if own and (own.get("self_supervised"), own.get("supervised")) != pair:
                out["notes"].append(f"{res['path']} reports its ratio as {own.get('self_supervised')} / "
                                    f"{own.get('supervised')}; the stages common to all runs give {pair[0]} / {pair[1]}")
    return out


def format_spread(spread: dict[str, Any]) -> str:
    """The table a person reads: EER mean, spread and range per stage; the paired change and whether it holds."""
    pct = 100.0
    lines = [f"{len(spread['runs'])} runs, trial list {spread['trials']}",
             f"{'stage':<22} {'EER % mean':>10} {'sd':>5} {'min':>6} {'max':>6}  {'change':>6} {'sd':>5}"
             "  (paired, from the stage before; holds: mean <= its mean + its sd)"]
    for s in spread["stages"]:
        line = f"{s['name']:<22} {pct * s['mean']:10.2f} {pct * s['sd']:5.2f} {pct * s['min']:6.2f} {pct * s['max']:6.2f}"
        if "change" in s:
            c = s["change"]
            line += f"  {pct * c['mean']:+6.2f} {pct * c['sd']:5.2f}  {'holds' if s['holds'] else 'WORSE'}"
        lines.append(line)
    if spread["missing"]:
        lines.append(f"left out (not in every run): {', '.join(spread['missing'])}")
    ratio = spread.get("ratio")
    if ratio:
        lines.append(f"EER {ratio['self_supervised']} / {ratio['supervised']} = {ratio['mean']:.2f} ± {ratio['sd']:.2f}"
                     f" ({ratio['min']:.2f} to {ratio['max']:.2f})")
    lines.extend(spread["notes"])
    return "\n".join(lines)
