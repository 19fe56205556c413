"""Ray Tune sweeps: the sweep YAML's checks, then a tiny ASHA sweep end to end on the toy corpus."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from raysv.config import ConfigError
from raysv.pipeline import RunState, plan, run_pipeline, stage_config
from raysv.run_config import load_config, round_config
from raysv.sweep import load_sweep, run_sweep
from raysv.sweep.spec import check_dev_trials, check_search_space

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
# With lr.head 1e-4 this decay is lr × decay = 1: every AdamW step wipes the weights, the encoder
# stops depending on its input and the dev EER is chance (50 %) from the first epoch.
BAD_DECAY = 1.0e4
EPOCHS = 3


def _sweep_file(folder: Path, overrides: list[str], **extra) -> Path:
    spec = {
        "config": str(DEMO),
        "overrides": overrides,
        "round": 1,
        "search_space": {
            "finetune.lr.weight_decay": {"grid": [1.0e-4, 1.0e-3, BAD_DECAY]},  # the bad value runs last
            "cluster.k2": {"choice": [5, 6]},
        },
        "scheduler": {"type": "asha", "grace_period": 1},
        "max_concurrent_trials": 1,
        "name": "tiny",
        **extra,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run_overrides(toy, runs) -> list[str]:
    # A randomly initialised ECAPA ranks the toy dev speakers above chance, while a DINO model of a
    # minute's training does not: fine-tuning from scratch at a small rate makes good trials
    # reliably better than the bad one after one epoch.
    return tiny_overrides(toy, runs) + [
        "name=swept", "dino.epochs=1", "eval.crops=0", f"finetune.epochs={EPOCHS}",
        "finetune.model.ecapa_init=scratch", "finetune.lr.head=1.0e-4", "finetune.lr.backbone=1.0e-4",
    ]


# ---------------------------------------------------------------- checks before any trial runs


def test_shipped_sweeps_load():
    for name in ("sweep_demo.yaml", "sweep_voxceleb2.yaml"):
        spec, overrides = load_sweep(ROOT / "configs" / name)
        cfg = load_config(ROOT / spec.config, overrides)
        check_search_space(cfg, spec.round, spec.search_space)
        assert cfg.data.dev_trials is not None and spec.metric == "dev_eer"
    spec, _ = load_sweep(ROOT / "configs" / "sweep_voxceleb2.yaml")
    assert spec.search_space["cluster.k1"] == {"grid": [30000, 50000, 70000]}
    assert spec.scheduler.grace_period == 3 and spec.scheduler.max_t == 15


def test_sweep_yaml_errors_name_the_key(tmp_path, toy):
    overrides = _run_overrides(toy, tmp_path)
    path = _sweep_file(tmp_path, overrides, schedular={"type": "asha"})
    with pytest.raises(ConfigError, match=r"schedular: unknown key"):
        load_sweep(path)
    path = _sweep_file(tmp_path, overrides)
    spec, run_overrides = load_sweep(path, ["sweep.num_samples=3", "cluster.k1=10"])
    assert spec.num_samples == 3 and run_overrides[-1] == "cluster.k1=10"
    cfg = load_config(spec.config, run_overrides)
    with pytest.raises(ConfigError, match=r"search_space\.finetune\.loss\.margn.*unknown key"):
        check_search_space(cfg, 1, {"finetune.loss.margn": {"uniform": [0.1, 0.3]}})
    with pytest.raises(ConfigError, match=r"search_space\.cluster\.k1 = 'many'"):
        check_search_space(cfg, 1, {"cluster.k1": {"grid": [8, "many"]}})
    with pytest.raises(ConfigError, match=r"k2 .* must be smaller"):
        check_search_space(cfg, 1, {"cluster.k1": {"grid": [8, 12]}, "cluster.k2": {"choice": [6, 9]}})
    with pytest.raises(ConfigError, match=r"search_space\.dino\.epochs"):
        check_search_space(cfg, 1, {"dino.epochs": {"grid": [1, 2]}})
    with pytest.raises(ConfigError, match=r"search_space\.finetune\.loss\.margin\.uniform"):
        check_search_space(cfg, 1, {"finetune.loss.margin": {"uniform": [0.3, 0.1]}})


def test_dev_trials_required_and_disjoint(tmp_path, toy):
    base = _run_overrides(toy, tmp_path)
    with pytest.raises(ConfigError, match=r"data\.dev_trials"):
        check_dev_trials(load_config(DEMO, base + ["data.dev_trials=null"]))
    test_list = toy.test / "trials.txt"
    with pytest.raises(ConfigError, match=r"also the test list data\.trials\.toy"):
        check_dev_trials(load_config(DEMO, base + [f"data.dev_trials={{path: {test_list}, audio_root: x}}"]))
    speaker = sorted(p.name for p in (toy.root / "train" / "wav").iterdir())[0]
    overlap = tmp_path / "dev_from_training.txt"
    overlap.write_text(f"1 {speaker}/s00/00001.wav {speaker}/s01/00001.wav\n")
    with pytest.raises(ConfigError, match=rf"also in the training shards \(e\.g\. {speaker}\)"):
        check_dev_trials(load_config(DEMO, base + [f"data.dev_trials={{path: {overlap}, audio_root: x}}"]))
    check_dev_trials(load_config(DEMO, base))


def test_sweep_needs_the_previous_round_embeddings(tmp_path, toy):
    path = _sweep_file(tmp_path, _run_overrides(toy, tmp_path / "runs"))
    with pytest.raises(FileNotFoundError, match=r"round_0/extract.*--until round_0/extract"):
        run_sweep(path)


# ---------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def swept(toy, tmp_path_factory):
    """Round 0 up to its embeddings, then a 3-trial ASHA sweep of round 1, one trial at a time."""
    import time

    runs = tmp_path_factory.mktemp("sweep_runs")
    overrides = _run_overrides(toy, runs)
    cfg = load_config(DEMO, overrides)
    run_pipeline(cfg, until="round_0/extract")
    before = json.loads((cfg.run_dir / "state.json").read_text())
    path = _sweep_file(runs, overrides)
    started = time.time()
    result = run_sweep(path)
    print(f"tiny sweep: {time.time() - started:.0f} s")
    return cfg, overrides, path, result, before


@pytest.mark.slow
def test_asha_stops_the_bad_trial(swept):
    cfg, _, _, result, _ = swept
    trials = {t["params"]["finetune.lr.weight_decay"]: t for t in result["trials"]}
    assert set(trials) == {1.0e-4, 1.0e-3, BAD_DECAY}
    bad = trials[BAD_DECAY]
    assert bad["status"] == "stopped" and 1 <= bad["iterations"] < EPOCHS
    assert bad["history"][0] == pytest.approx(0.5)  # chance: the wiped encoder cannot tell speakers apart
    completed = [t for t in result["trials"] if t["status"] == "completed"]
    assert completed and all(t["iterations"] == EPOCHS and len(t["history"]) == EPOCHS for t in completed)
    assert result["best"]["finetune.lr.weight_decay"] != BAD_DECAY
    assert result["dev_eer"] < bad["dev_eer"]
    assert result["best"]["cluster.k2"] in (5, 6)
    for t in result["trials"]:  # each trial clustered with its own k2 into its own folder
        clusters = json.loads((cfg.run_dir / "sweeps/tiny/trials" / t["trial_id"] / "cluster/clusters.json").read_text())
        assert clusters["k2"] == t["params"]["cluster.k2"]


@pytest.mark.slow
def test_mlflow_holds_one_child_per_trial(swept):
    cfg, _, _, result, before = swept
    db = sqlite3.connect(Path(cfg.runs) / "mlflow.db")

    def tag(key: str, value: str) -> list[str]:
        return [r[0] for r in db.execute("select run_uuid from tags where key=? and value=?", (key, value))]

    (parent,) = tag("raysv.kind", "sweep")
    assert tag("mlflow.parentRunId", before["mlflow_parent"]).count(parent) == 1  # nested in the pipeline's run
    children = tag("mlflow.parentRunId", parent)
    assert len(children) == len(result["trials"]) == 3
    by_trial = {db.execute("select value from tags where run_uuid=? and key='raysv.trial'", (c,)).fetchone()[0]: c
                for c in children}
    assert set(by_trial) == {t["trial_id"] for t in result["trials"]}
    for t in result["trials"]:
        run = by_trial[t["trial_id"]]
        params = dict(db.execute("select key, value from params where run_uuid=?", (run,)).fetchall())
        assert float(params["finetune.lr.weight_decay"]) == t["params"]["finetune.lr.weight_decay"]
        steps = [s for (s,) in db.execute("select step from metrics where run_uuid=? and key='dev_eer'", (run,))]
        assert len(steps) >= t["iterations"] and 0 in steps  # logged by rank 0 every epoch
        status = db.execute("select status from runs where run_uuid=?", (run,)).fetchone()[0]
        assert status == {"completed": "FINISHED", "stopped": "KILLED"}[t["status"]]
    best = db.execute("select value from metrics where run_uuid=? and key='best.dev_eer'", (parent,)).fetchone()[0]
    assert best == pytest.approx(result["dev_eer"])


@pytest.mark.slow
def test_best_yaml_continues_the_run_without_redoing_stages(swept):
    cfg, overrides, _, result, before = swept
    best = yaml.safe_load(Path(result["output"]).read_text())
    assert best == {"rounds": {"overrides": {1: {"cluster": {"k2": result["best"]["cluster.k2"]},
                                                 "finetune": {"lr": {"weight_decay": result["best"]["finetune.lr.weight_decay"]}}}}}}
    assert result["restart_from"] is None
    merged = load_config(DEMO, overrides, merge=[result["output"]])
    assert round_config(merged, 1).finetune.lr.weight_decay == result["best"]["finetune.lr.weight_decay"]
    assert round_config(merged, 1).cluster.k2 == result["best"]["cluster.k2"]
    assert merged.finetune.lr.weight_decay == cfg.finetune.lr.weight_decay  # other rounds keep theirs
    state = RunState(cfg.run_dir)
    done = [s for s in plan(cfg) if state.done(s)]
    assert [s.id for s in done] == ["round_0/dino", "round_0/eval", "round_0/extract"]
    for stage in done:
        assert json.loads(json.dumps(stage_config(merged, stage))) == state.done(stage)["config"]
    run_pipeline(merged, until="round_0/extract")  # refuses a changed completed stage; here nothing runs
    after = json.loads((cfg.run_dir / "state.json").read_text())
    assert {k: v["finished"] for k, v in after["stages"].items()} == {k: v["finished"] for k, v in before["stages"].items()}


@pytest.mark.slow
def test_rerun_returns_the_finished_sweep(swept):
    cfg, _, path, result, _ = swept
    again = run_sweep(path)
    assert [t["trial_id"] for t in again["trials"]] == [t["trial_id"] for t in result["trials"]]
    assert again["best"] == result["best"]
    db = sqlite3.connect(Path(cfg.runs) / "mlflow.db")
    assert db.execute("select count(*) from tags where key='raysv.trial'").fetchone()[0] == 3
    changed = path.with_name("sweep_changed.yaml")
    changed.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"num_samples": 2}))
    with pytest.raises(ConfigError, match="already ran with other settings"):
        run_sweep(changed)
