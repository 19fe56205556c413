"""configs/voxceleb2.yaml end to end at full model size, on 2 Ray Train workers (gloo on CPU).

Only what the toy corpus and this machine force is overridden: data paths, epochs (the gate and
correction start in the second of two epochs, as they start part-way through the reference's
15), steps per epoch (one), batch sizes (4 per worker), Ray resources, one round, cluster and AS-norm
cohort sizes, two evaluation crops; the trial lists (O, E and H alike, and dev) are the first 12
trials of the toy lists. The models are the reference's: ECAPA-TDNN 1024/3072 with
the 65,536-prototype DINO head, WavLM Base+ (random weights saved as a local pre-trained
folder) with MHFA 64 × 128.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysv.artifacts.checkpoint import MODEL_FILE, load_training_state, read_model_json
from raysv.artifacts.embeddings import read_embeddings

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_run(toy, tmp_path_factory):
    import ray

    from raysv.models.wavlm_mhfa import reference_wavlm_base_plus_config, save_random_wavlm

    root = tmp_path_factory.mktemp("reference_scale")
    wavlm = save_random_wavlm(root / "wavlm-base-plus", reference_wavlm_base_plus_config())
    lists = {}
    for name, folder in (("test", toy.test), ("dev", toy.dev)):
        lists[name] = root / f"{name}_trials.txt"
        lists[name].write_text("".join((folder / "trials.txt").read_text().splitlines(keepends=True)[:12]))
    overrides = [
        f"runs={root / 'runs'}", "name=voxceleb2",
        f"data.shards={toy.shards}",
        *(f"data.trials.{name}={{path: {lists['test']}, audio_root: {toy.test / 'wav'}}}" for name in "OEH"),
        f"data.dev_trials={{path: {lists['dev']}, audio_root: {toy.dev / 'wav'}}}",
        "data.augment.musan=null", "data.augment.rir=null", "data.shuffle_buffer=8",
        "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.data_cpus=2", "ray.max_failures=0",
        "dino.epochs=1", "dino.batch_size=8",
        "train.max_steps_per_epoch=1",
        "cluster.k1=12", "cluster.k2=6",
        f"finetune.model.pretrained={wavlm}",
        "finetune.epochs=2", "finetune.batch_size=8",
        "finetune.loss_gate.start_epoch=1", "finetune.label_correction.start_epoch=1",
        "lmft.epochs=1", "lmft.batch_size=8",
        "rounds.count=1",
        "eval.crops=2", "eval.asnorm.top_n=10", "eval.asnorm.cohort_size=16",
    ]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    cmd = [sys.executable, "-m", "raysv.cli", "run", "--config", str(ROOT / "configs" / "voxceleb2.yaml"), *overrides]
    with open(root / "console.txt", "w") as console:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=console, stderr=subprocess.STDOUT, timeout=900)
    text = (root / "console.txt").read_text()
    assert done.returncode == 0, text[-4000:]
    run_dir = root / "runs" / "voxceleb2"
    yield run_dir, text
    shutil.rmtree(root, ignore_errors=True)  # WavLM Base+ checkpoints with optimiser state: ~1.5 GB each


def test_every_stage_ran_and_handed_on(reference_run):
    run_dir, console = reference_run
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["name"] for row in results["stages"]] == ["round_0/dino", "round_1/finetune", "round_1/lmft"]
    for row in results["stages"]:
        assert 0.0 <= row["eer"] <= 1.0 and {"O", "dev"} <= set(row["trials"])
        assert "eer_asnorm" in row["trials"]["O"]  # AS-norm beside the raw figures, as configured
    assert (run_dir / "round_0/extract/embeddings.parquet").is_file()
    assert (run_dir / "round_0/cluster/labels.parquet").is_file()
    for stage in ("round_1/eval", "round_1/lmft_eval"):  # no extraction after them: only the AS-norm sample embedded
        cohort, _ = read_embeddings(run_dir / stage / "cohort" / "embeddings.parquet")
        assert len(cohort) == 16, stage
    # The settings record of each Ray Train run: the large-margin stage started from the round's
    # model and classifier, and both fine-tunes are drawn (L2-SP) towards the pre-trained WavLM.
    records = {p.parent.name: json.loads(p.read_text()) for p in run_dir.rglob("raysv_run.json")}
    lmft, finetune = records["voxceleb2-round_1-lmft"], records["voxceleb2-round_1-finetune"]
    assert lmft["init"] == str((run_dir / "round_1/finetune/model").resolve()) and lmft["init_classifier"] is True
    assert lmft["anchor"] == finetune["anchor"] == finetune["pretrained"] and finetune["init"] is None


def test_models_were_the_reference_sizes(reference_run):
    run_dir, _ = reference_run
    dino = read_model_json(run_dir / "round_0/dino/model")
    assert {k: dino["encoder"][k] for k in ("channels", "mfa_channels", "embed_dim")} == \
        {"channels": 1024, "mfa_channels": 3072, "embed_dim": 512}
    method = load_training_state(run_dir / "round_0/dino/model")["method"]
    head_outputs = {t.shape[0] for k, t in _tensors(method) if "last_layer" in k}
    assert 65536 in head_outputs, sorted(head_outputs)
    for stage in ("round_1/finetune", "round_1/lmft"):
        spec = read_model_json(run_dir / stage / "model")["encoder"]
        assert spec["kind"] == "wavlm_mhfa" and (spec["heads"], spec["compression"]) == (64, 128)
        weights = torch.load(run_dir / stage / "model" / MODEL_FILE, map_location="cpu", weights_only=True)
        layers = {k.split(".")[3] for k in weights if k.startswith("backbone.encoder.layers.")}
        assert len(layers) == 12
        assert weights["backbone.encoder.layers.0.attention.q_proj.weight"].shape == (768, 768)
        assert sum(t.numel() for k, t in weights.items() if k.startswith("backbone.")) > 94e6


def test_training_ran_on_two_workers(reference_run):
    run_dir, _ = reference_run
    for stage in ("round_0/dino", "round_1/finetune", "round_1/lmft"):
        history = load_training_state(run_dir / stage / "model")["history"]
        assert history and all(h["world_size"] == 2 for h in history), stage
    gated = load_training_state(run_dir / "round_1/finetune/model")["history"]
    assert [h["epoch"] for h in gated] == [0, 1]


def _tensors(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _tensors(v, f"{prefix}.{i}")
