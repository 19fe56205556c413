"""The DINO method and the shared training loop: in-process logic, then real Ray Train runs."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_overrides
from raysv.artifacts.checkpoint import load_training_state
from raysv.data.pipelines import multi_crop_batch
from raysv.methods.dino import DinoMethod, dino_loss, diversity_terms
from raysv.models import load_encoder
from raysv.run_config import load_config
from raysv.train.loop import run_epochs

ROOT = Path(__file__).resolve().parents[2]


def test_dino_loss_matches_direct_computation():
    torch.manual_seed(0)
    student = [torch.randn(4, 10) for _ in range(3)]
    teacher = [torch.randn(4, 10) for _ in range(2)]
    center = torch.randn(1, 10) * 0.1
    expected, pairs = 0.0, 0
    for q in range(2):
        t = torch.softmax((teacher[q] - center) / 0.04, dim=-1)
        for v in range(3):
            if v != q:
                expected += (-(t * torch.log_softmax(student[v] / 0.1, dim=-1)).sum(-1)).mean()
                pairs += 1
    assert dino_loss(student, teacher, center, 0.1, 0.04) == pytest.approx(float(expected / pairs), rel=1e-6)


def test_diversity_terms_match_numpy():
    rng = np.random.default_rng(0)
    views = [rng.normal(size=(16, 6)) * rng.uniform(0.2, 2.0, size=6) for _ in range(2)]
    expected_var, expected_cov = 0.0, 0.0
    for z in views:
        std = np.sqrt(z.var(axis=0, ddof=1) + 1e-4)
        expected_var += np.maximum(0.0, 1.0 - std).mean() / 2
        cov = np.cov(z, rowvar=False)
        expected_cov += (cov[~np.eye(6, dtype=bool)] ** 2).sum() / 6 / 2
    variance, covariance = diversity_terms([torch.tensor(z, dtype=torch.float32) for z in views])
    assert float(variance) == pytest.approx(expected_var, rel=1e-4)
    assert float(covariance) == pytest.approx(expected_cov, rel=1e-4)
    # a batch collapsed onto one direction is penalised; decorrelated unit-variance dimensions are not
    direction = rng.normal(size=(1, 6))
    collapsed = torch.tensor(rng.normal(size=(64, 1)) * direction * 3, dtype=torch.float32)
    centred = rng.normal(size=(64, 6))
    centred -= centred.mean(axis=0)
    spread = torch.tensor(np.linalg.qr(centred)[0] * np.sqrt(63), dtype=torch.float32)  # covariance = identity
    assert float(diversity_terms([collapsed])[1]) > 10 * float(diversity_terms([spread])[1])
    assert float(diversity_terms([spread])[0]) == pytest.approx(0.0, abs=1e-3)


def test_dino_diversity_is_added_to_the_loss(toy, tmp_path):
    cfg = _cfg(toy, tmp_path, "dino.diversity.variance=1.0", "dino.diversity.covariance=0.5")
    batches = _batches(toy, cfg, n_batches=1)
    method = DinoMethod(cfg.dino, seed=cfg.seed, steps_per_epoch=1)
    method.setup(torch.device("cpu"), lambda m: m)
    method.start_epoch(0)
    out = method.train_step(dict(batches[0]))
    assert out["loss"] == pytest.approx(out["dino_loss"] + out["variance"] + 0.5 * out["covariance"], rel=1e-5)
    assert out["covariance"] > 0


def _cfg(toy, tmp_path, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(toy, tmp_path) + list(extra))


def _batches(toy, cfg, n_batches=3, batch=4):
    """In-process batches through the same crop function the Ray Data pipeline runs."""
    table = pq.read_table(sorted(Path(toy.shards).glob("part-*.parquet"))[0], columns=["utt_index", "audio"])
    views = {"global": (2, cfg.dino.crops.global_seconds), "local": (1, cfg.dino.crops.local_seconds)}
    out = []
    for i in range(n_batches):
        rows = {k: np.asarray(table.column(k).to_pylist()[i * batch:(i + 1) * batch], dtype=object) for k in ("utt_index", "audio")}
        crops = multi_crop_batch(rows, views, aug=None)
        out.append({k: torch.from_numpy(np.asarray(v)) for k, v in crops.items() if k != "pid"})
    return out


def test_dino_in_process_steps_and_resume(toy, tmp_path):
    cfg = _cfg(toy, tmp_path, "dino.epochs=2", "dino.freeze_last_layer_epochs=1")
    batches = _batches(toy, cfg)
    method = DinoMethod(cfg.dino, seed=cfg.seed, steps_per_epoch=len(batches))
    method.setup(torch.device("cpu"), lambda m: m)
    last_before = [p.detach().clone() for p in method.last_layer]
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    seen = {}
    run_epochs(method, lambda e: [dict(b) for b in batches], 0, lambda e, m, idx: seen.setdefault(e, m), None)
    assert set(seen) == {0, 1} and all(np.isfinite(m["loss"]) for m in seen.values())
    # last layer frozen in epoch 0 only: after 2 epochs it moved, and the teacher followed the student
    assert any(not torch.equal(a, b) for a, b in zip(last_before, method.last_layer))
    assert any(not torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items() if v.dtype.is_floating_point)
    assert float(method.center.abs().sum()) > 0
    # the checkpoint state loads with weights_only and reproduces the next step exactly
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = DinoMethod(cfg.dino, seed=cfg.seed, steps_per_epoch=len(batches))
    clone.setup(torch.device("cpu"), lambda m: m)
    clone.load_state_dict(state)
    torch.manual_seed(5)
    a = method.train_step(dict(batches[0]))
    torch.manual_seed(5)
    b = clone.train_step(dict(batches[0]))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_frozen_last_layer_in_first_epoch(toy, tmp_path):
    cfg = _cfg(toy, tmp_path, "dino.freeze_last_layer_epochs=1")
    batches = _batches(toy, cfg, n_batches=2)
    method = DinoMethod(cfg.dino, seed=cfg.seed, steps_per_epoch=2)
    method.setup(torch.device("cpu"), lambda m: m)
    before = [p.detach().clone() for p in method.last_layer]
    method.start_epoch(0)
    for b in batches:
        method.train_step(dict(b))
    assert all(torch.equal(a, p) for a, p in zip(before, method.last_layer))


@pytest.mark.slow
def test_two_workers_disjoint_shards_and_worker_replacement(toy, tmp_path):
    """One real TorchTrainer run: 2 CPU workers, a worker killed at epoch 1 and replaced."""
    from raysv.data.pipelines import multi_crop_dataset
    from raysv.methods.dino import dino_views
    from raysv.stages.base import train_settings
    from raysv.train.trainer import fit

    cfg = _cfg(toy, tmp_path, "ray.num_workers=2", "dino.epochs=3", "ray.max_failures=1", "dino.batch_size=8")
    record = tmp_path / "record"
    record.mkdir()
    marker = tmp_path / "killed"
    dataset = multi_crop_dataset(cfg.data, dino_views(cfg.dino.crops))
    out = fit("dino", cfg.dino, dataset, tmp_path / "model", train_settings(cfg, "ft"),
              method_args={"steps_per_epoch": 4}, fault={"epoch": 1, "marker": str(marker)}, record_dir=str(record))
    assert marker.exists(), "the fault hook did not fire"
    history = load_training_state(out)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # none repeated, none skipped
    assert all(50 < h["peak_rss_mb"] < 64 * 1024 for h in history)  # the worker's peak memory is recorded
    killed_pid = int(marker.read_text())
    assert history[0]["worker_pid"] == killed_pid  # epoch 0 was not repeated after the restart
    assert history[1]["worker_pid"] != killed_pid and history[2]["worker_pid"] == history[1]["worker_pid"]
    assert len(list(record.glob("epoch0_*"))) == 2
    n_utts = pq.ParquetFile(Path(cfg.data.shards) / "manifest.parquet").metadata.num_rows
    for epoch in range(3):
        files = sorted(record.glob(f"epoch{epoch}_rank*"))
        assert len(files) == 2
        parts = [set(np.load(f).tolist()) for f in files]
        assert not parts[0] & parts[1], "workers saw overlapping utterances"
        assert len(parts[0]) == len(parts[1]) > 0
        assert len(parts[0] | parts[1]) <= n_utts
        worker_pids = {int(f.stem.split("pid")[1]) for f in files}
        data_pids = {int(p) for h in history if h["epoch"] == epoch for p in str(h["data_pids"]).split(",") if p}
        assert data_pids and not data_pids & worker_pids, "decoding ran inside a training worker"
    encoder, meta = load_encoder(out)
    assert meta["encoder"]["kind"] == "ecapa"
    wave = torch.randn(1, 16000)
    assert encoder(wave).shape == (1, 32)
