"""The whole method end to end on the toy corpus, its console and MLflow runs, refusal of a changed config."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides
from raysv.pipeline import ConfigChanged, plan, run_pipeline
from raysv.run_config import load_config, round_config
from raysv.stages.finetune import finetune_init

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_round(toy, tmp_path_factory):
    """One shared end-to-end run of 1 round by `raysv run`, its console going to a file as under `ray job logs`."""
    import ray

    runs = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(toy, runs) + ["rounds.count=1", "name=e2e", "finetune.epochs=3",
                                             "simclr.enabled=true", "simclr.epochs=1", "simclr.batch_size=8",
                                             "simclr.crop_seconds=1.0"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "raysv.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]
    with open(cfg.run_dir.parent / "console.txt", "w") as console:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT, check=True, timeout=1200)
    results = json.loads((cfg.run_dir / "results.json").read_text())
    return cfg, results


def test_full_run_writes_every_stage(one_round):
    import torch

    from raysv.artifacts.checkpoint import load_training_state, load_weights

    cfg, results = one_round
    state = json.loads((cfg.run_dir / "state.json").read_text())
    assert set(state["stages"]) == {s.id for s in plan(cfg)}
    for stage in plan(cfg):
        assert (cfg.run_dir / stage.id / "_complete.json").is_file()
    names = [row["name"] for row in results["stages"]]
    assert names == ["round_0/dino", "baseline/simclr", "round_1/finetune", "round_1/lmft",
                     "reference/finetune", "reference/lmft"]
    for row in results["stages"]:
        assert 0.0 <= row["eer"] <= 1.0 and "toy" in row["trials"] and "dev" in row["trials"]
    # The supervised reference: true speakers, gate and correction off, and the headline ratio.
    rows = {row["name"]: row for row in results["stages"]}
    ratio = results["ratio"]
    assert (ratio["self_supervised"], ratio["supervised"]) == ("round_1/lmft", "reference/lmft")
    assert ratio["eer_ratio"] == pytest.approx(rows["round_1/lmft"]["eer"] / rows["reference/lmft"]["eer"])
    assert 0 < ratio["low"] <= ratio["high"]  # its speaker-bootstrap interval
    for name, before in (("round_1/finetune", "round_0/dino"), ("round_1/lmft", "round_1/finetune")):
        change = rows[name]["change"]  # each self-supervised model against the one before it
        assert change["vs"] == before and change["low"] <= change["high"]
        assert change["eer"] == pytest.approx(rows[name]["eer"] - rows[before]["eer"])
    assert "change" not in rows["round_0/dino"] and "change" not in rows["reference/finetune"]
    true = pq.read_table(cfg.run_dir / "reference/finetune/true_labels/labels.parquet")
    assert len(set(true.column("label").to_pylist())) == 6  # the toy corpus's 6 training speakers
    # The large margin keeps the mean of its start (the stage it continues) and its end (lmft.start_weight).
    for lmft, start in (("round_1/lmft", "round_1/finetune"), ("reference/lmft", "reference/finetune")):
        model = cfg.run_dir / lmft / "model"
        assert json.loads((model / "model.json").read_text())["start_weight"] == cfg.lmft.start_weight == 0.5
        trained = load_training_state(model)["method"]["model"]
        kept, first = load_weights(model), load_weights(cfg.run_dir / start / "model")
        for name in ("tdnn.conv_in.weight", "tdnn.norm_in.running_mean"):
            assert torch.allclose(kept[name], 0.5 * (trained[f"encoder.{name}"] + first[name]), atol=1e-6), name
    reference_history = load_training_state(cfg.run_dir / "reference/finetune/model")["history"]
    assert all(h["dropped"] == 0 and h["corrected"] == 0 for h in reference_history)
    assert len(reference_history) == cfg.finetune.epochs
    assert 0.0 <= results["stages"][0]["nmi"] <= 1.0
    saved = json.loads((cfg.run_dir / "results.json").read_text())
    assert saved["stages"][0]["eer"] == pytest.approx(results["stages"][0]["eer"])
    assert (cfg.run_dir / "round_0/cluster/labels.parquet").is_file()
    assert (cfg.run_dir / "round_1/finetune/model/labels.parquet").is_file()
    assert (cfg.run_dir / "round_0/eval/toy/det.png").is_file()
    simclr = json.loads((cfg.run_dir / "baseline/simclr/model/model.json").read_text())
    assert simclr["method"] == "simclr"  # the contrastive baseline ran as a stage and was scored
    assert (cfg.run_dir / "baseline/simclr_eval/metrics.json").is_file()


def test_seeds_reads_the_results_a_run_writes(one_round, tmp_path):
    from raysv.evaluation.seeds import seed_spread

    cfg, results = one_round
    again = tmp_path / "again"  # the same figures under another run's name: no spread
    again.mkdir()
    shutil.copy(cfg.run_dir / "results.json", again / "results.json")
    spread = seed_spread([cfg.run_dir, again])
    rows = {row["name"]: row for row in results["stages"]}
    assert [s["name"] for s in spread["stages"]] == list(rows) and spread["missing"] == []
    assert spread["trials"] == "toy"
    for stage in spread["stages"]:
        assert stage["mean"] == pytest.approx(rows[stage["name"]]["eer"]) and stage["sd"] == 0
    change = {s["name"]: s for s in spread["stages"]}["round_1/finetune"]["change"]
    assert change["vs"] == "round_0/dino"  # past the SimCLR baseline, as the run's own change
    assert change["mean"] == pytest.approx(rows["round_1/finetune"]["change"]["eer"])
    assert spread["ratio"]["mean"] == pytest.approx(results["ratio"]["eer_ratio"]) and spread["notes"] == []
    assert seed_spread([cfg.run_dir, again], trials="dev")["stages"][0]["mean"] == pytest.approx(
        rows["round_0/dino"]["trials"]["dev"]["eer"])


def test_console_shows_progress_not_ray_internals(one_round):
    """What `raysv run` prints to a file: stage lines, a line per epoch, a line per trial list by its key."""
    cfg, _ = one_round
    text = (cfg.run_dir.parent / "console.txt").read_text()
    for forbidden in ("TrainingReport(", "checkpoint_", "{'", "Traceback", "(raylet)", "\r"):
        assert forbidden not in text, forbidden
    lines = (cfg.run_dir.parent / "console.txt").read_text().splitlines()
    assert len(lines) <= 80, "\n".join(lines)
    assert any(" toy: EER " in line for line in lines) and any(" dev: EER " in line for line in lines)
    assert any("supervised epoch 3/3" in line for line in lines)
    assert any("supervised: 1 worker(s) on cpu" in line and line.endswith("(ray.precision auto)") for line in lines)
    assert any(line.startswith("EER round_1/lmft / reference/lmft = ") and "90 % interval" in line for line in lines)
    assert (cfg.run_dir / "run.log").is_file() and "=== round_1/finetune ===" in (cfg.run_dir / "run.log").read_text()


def test_mlflow_holds_parent_children_and_eer(one_round):
    cfg, _ = one_round
    db = sqlite3.connect(Path(cfg.runs) / "mlflow.db")
    runs = dict(db.execute("select run_uuid, name from runs").fetchall())
    parents = db.execute("select run_uuid from tags where key='raysv.kind' and value='pipeline'").fetchall()
    assert len(parents) == 1
    children = db.execute("select run_uuid from tags where key='mlflow.parentRunId' and value=?", parents[0]).fetchall()
    assert len(children) == len(plan(cfg))
    eer = db.execute("select count(*) from metrics where key like '%eer%'").fetchone()[0]
    assert eer >= 3 and len(runs) >= len(children) + 1


def test_changed_config_is_refused(one_round, toy):
    cfg, _ = one_round
    changed = load_config(
        ROOT / "configs" / "demo.yaml",
        tiny_overrides(toy, cfg.runs) + ["rounds.count=1", "name=e2e", "cluster.k1=10"],
    )
    with pytest.raises(ConfigChanged, match=r"cluster\.k1: 12 → 10"):
        run_pipeline(changed)


def _true_label_model(toy, folder: Path, cfg) -> Path:
    """A small ECAPA trained in-process on the toy corpus's true speakers, saved as a raysv model."""
    import pyarrow.parquet as pq
    import torch

    from raysv.artifacts.checkpoint import save_model
    from raysv.artifacts.labels import write_labels
    from raysv.data.pipelines import labelled_crop_batch
    from raysv.methods.supervised import SupervisedMethod
    from raysv.train.loop import run_epochs

    table = pq.read_table(sorted(Path(toy.shards).glob("part-*.parquet")))
    speakers = table.column("speaker").to_pylist()
    names = sorted(set(speakers))
    utt = np.asarray(table.column("utt_index").to_pylist())
    labels = np.asarray([names.index(s) for s in speakers], dtype=np.int32)
    write_labels(folder, utt, labels)
    audio = np.asarray(table.column("audio").to_pylist(), dtype=object)
    torch.manual_seed(0)
    method = SupervisedMethod(cfg.finetune, seed=cfg.seed, steps_per_epoch=len(utt) // 8,
                              labels=str(folder / "labels.parquet"))
    method.setup(torch.device("cpu"), lambda m: m)
    rng = np.random.default_rng(0)

    def batches(epoch):
        order = rng.permutation(len(utt))
        for i in range(0, len(order) - 7, 8):
            rows = {"audio": audio[order[i:i + 8]], "label": labels[order[i:i + 8]], "utt_index": utt[order[i:i + 8]]}
            out = labelled_crop_batch(rows, 1.5, None, with_clean=False, rng=rng)
            yield {k: torch.from_numpy(v) for k, v in out.items() if k != "pid"}

    run_epochs(method, batches, 0, lambda e, m, idx: None)
    return save_model(folder / "model", method.encoder(), method.model_info())


def test_verify_scores_as_evaluated_and_decides(toy, tmp_path):
    from raysv.data.trials import read_trials
    from raysv.inference import load_model
    from raysv.stages.evaluate import evaluate_checkpoint

    quick = load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(toy, tmp_path) + [
        "finetune.epochs=12", "finetune.loss_gate.enabled=false", "finetune.label_correction.enabled=false",
        "finetune.lr.head=0.005", "finetune.lr.backbone=1.0e-4", "finetune.loss.margin=0.1"])
    checkpoint = _true_label_model(toy, tmp_path, quick)
    results = evaluate_checkpoint(quick, checkpoint)  # stores the dev-list threshold in model.json
    # One embedding pass serves every list: the same figures as a list embedded on its own.
    from raysv.evaluation.evaluate import evaluate_trials

    name, trial_list = next(iter(quick.data.trials.items()))
    alone = evaluate_trials(trial_list.path, trial_list.audio_root, checkpoint=checkpoint,
                            protocol=quick.eval.protocol(), plots_dir=tmp_path / "alone")
    assert set(results) == {"dev", name}
    assert results[name]["eer"] == pytest.approx(alone["eer"], abs=1e-6)
    assert results[name]["min_dcf_0.01"] == pytest.approx(alone["min_dcf_0.01"], abs=1e-6)
    assert results[name]["eer"] < 0.5  # trained on true speakers: better than chance on new ones
    model = load_model(checkpoint)
    assert model.threshold is not None
    # verify scores a pair exactly as the evaluation scored that trial, and decides by the threshold
    rows = [line.split() for line in (tmp_path / "alone" / "scores.txt").read_text().splitlines()]
    rng = np.random.default_rng(0)
    wav = toy.test / "wav"
    for i in rng.choice(len(rows), 12, replace=False):
        evaluated, _, enroll, test = rows[i][:4]
        score, same = model.verify(wav / enroll, wav / test)
        assert score == pytest.approx(float(evaluated), abs=1e-5)
        assert same == (score >= model.threshold)
    trials = read_trials(toy.test / "trials.txt")
    tar = np.flatnonzero(trials.labels == 1)
    out = subprocess.run([sys.executable, "-m", "raysv.cli", "verify", "--checkpoint", str(checkpoint),
                          str(wav / trials.enroll[tar[0]]), str(wav / trials.test[tar[0]])],
                         capture_output=True, text=True, check=True).stdout
    score = model.score(wav / trials.enroll[tar[0]], wav / trials.test[tar[0]])
    assert f"score {score:.4f}" in out
    assert ("same speaker" in out) == (score >= model.threshold)


def test_each_round_fine_tunes_from_its_configured_start(tmp_path):
    def starts(*overrides: str) -> list:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"runs={tmp_path}", "rounds.count=3", *overrides])
        return [finetune_init(round_config(cfg, r), r) for r in (1, 2, 3)]

    run = tmp_path / "demo"
    dino = run / "round_0" / "dino" / "model"
    assert starts() == [dino, dino, dino]  # every round restarts from the DINO encoder
    assert starts("finetune.init=previous") == [
        dino, run / "round_1" / "finetune" / "model", run / "round_2" / "finetune" / "model"]
    assert starts("rounds.overrides={3: {finetune: {init: previous}}}") == [
        dino, dino, run / "round_2" / "finetune" / "model"]
    assert starts("finetune.model.ecapa_init=scratch") == [None, None, None]
