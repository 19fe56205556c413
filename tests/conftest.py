"""Shared fixtures: one local Ray cluster per test session, small toy corpora made once."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s and waits a poll between its steps; the tests'
# runs train for seconds, so they poll at 0.2 s (two tiny fine-tunes: 100-104 s -> 72-81 s).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster with more logical CPUs than the machine's 2 cores."""
    import ray

    if not ray.is_initialized():
        from raysv.runtime import local_system_config

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _system_config=local_system_config(8))  # as raysv's own local clusters
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def toy(tmp_path_factory, ray_session):
    """A tiny training corpus (prepared into shards) and test/dev corpora of other speakers."""
    from types import SimpleNamespace

    from raysv.audio.synth import synthesize
    from raysv.data.prepare import prepare_shards

    root = tmp_path_factory.mktemp("toy")
    synthesize(root / "train", speakers=6, sessions=3, utterances=4, min_seconds=1.0, max_seconds=2.0, trials=0, seed=3)
    synthesize(root / "test", speakers=6, sessions=2, utterances=4, min_seconds=1.0, max_seconds=2.0,
               trials=300, speaker_offset=1000, seed=3)
    synthesize(root / "dev", speakers=4, sessions=2, utterances=3, min_seconds=1.0, max_seconds=2.0,
               trials=120, speaker_offset=2000, seed=3)
    prepare_shards(root / "train" / "wav", root / "shards", shard_size=24, show_progress=False)
    return SimpleNamespace(root=root, shards=root / "shards", test=root / "test", dev=root / "dev")


def save_tiny_ecapa(folder, threshold: float):
    """A small random ECAPA checkpoint that scores whole files (no crops) against ``threshold``."""
    import torch

    from raysv.artifacts.checkpoint import read_model_json, save_model, write_model_json
    from raysv.models.ecapa import ECAPAEncoder

    torch.manual_seed(0)
    folder = save_model(folder, ECAPAEncoder(channels=32, mfa_channels=96, embed_dim=16))
    meta = read_model_json(folder)
    meta.update({"threshold": threshold, "eval": {"crops": 0, "max_seconds": 30.0}})
    write_model_json(folder, meta)
    return folder


def tiny_overrides(toy, runs) -> list[str]:
    """Overrides that make configs/demo.yaml run in seconds on the toy fixture."""
    return [
        f"runs={runs}",
        f"data.shards={toy.shards}",
        f"data.trials={{toy: {{path: {toy.test / 'trials.txt'}, audio_root: {toy.test / 'wav'}}}}}",
        f"data.dev_trials={{path: {toy.dev / 'trials.txt'}, audio_root: {toy.dev / 'wav'}}}",
        "dino.encoder={channels: 32, mfa_channels: 96, embed_dim: 32}",
        "dino.head={hidden_dim: 64, bottleneck_dim: 16, out_dim: 64}",
        "dino.crops={global_count: 2, global_seconds: 1.0, local_count: 1, local_seconds: 0.5}",
        "dino.batch_size=8",
        "dino.epochs=2",
        "finetune.model.ecapa={channels: 32, mfa_channels: 96, embed_dim: 32}",
        "finetune.batch_size=8",
        "finetune.epochs=2",
        "finetune.crop_seconds=1.0",
        "finetune.loss_gate.start_epoch=1",
        "finetune.label_correction.start_epoch=1",
        "cluster.k1=12",
        "cluster.k2=6",
        "lmft.epochs=1",
        "lmft.crop_seconds=1.5",
        "eval.crops=1",
        "eval.crop_seconds=1.0",
        "extract.num_actors=1",
        "ray.num_workers=1",
        "ray.cpus_per_worker=1",  # the 2-worker and sweep tests share the session's 8 logical CPUs
        "data.shuffle_buffer=8",
    ]
