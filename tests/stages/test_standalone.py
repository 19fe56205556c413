"""Single-stage commands never resume another run: their Ray Train run is keyed by the output folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_overrides
from raysv.artifacts.checkpoint import load_training_state
from raysv.artifacts.labels import write_labels
from raysv.config import ConfigError
from raysv.run_config import load_config
from raysv.stages.base import standalone_run_name, train_settings
from raysv.train.trainer import check_resumable

ROOT = Path(__file__).resolve().parents[2]


def _cfg(toy, runs, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", tiny_overrides(toy, runs) + ["name=standalone", *extra])


def test_run_name_follows_the_output_folder(toy, tmp_path):
    cfg = _cfg(toy, tmp_path)
    a, b = standalone_run_name(cfg, "finetune", tmp_path / "A"), standalone_run_name(cfg, "finetune", tmp_path / "B")
    assert a != b and a == standalone_run_name(cfg, "finetune", tmp_path / "x" / ".." / "A")
    assert a.startswith("standalone-finetune-")


def test_resuming_other_settings_is_refused_naming_the_keys(toy, tmp_path, caplog):
    cfg = _cfg(toy, tmp_path)
    settings = train_settings(cfg, "standalone-finetune-x", tmp_path / "out")
    check_resumable(settings, {"finetune": {"epochs": 2, "loss_gate": {"enabled": True}}})
    record = Path(settings.storage) / settings.run_name / "raysv_run.json"
    assert json.loads(record.read_text())["finetune"]["epochs"] == 2
    (record.parent / "checkpoint_2026-01-01").mkdir()
    with caplog.at_level(logging.INFO, logger="raysv"):
        check_resumable(settings, {"finetune": {"epochs": 2, "loss_gate": {"enabled": True}}})
    assert "resuming training run standalone-finetune-x" in caplog.text
    with pytest.raises(ConfigError, match=r"finetune\.loss_gate\.enabled: True → False") as err:
        check_resumable(settings, {"finetune": {"epochs": 2, "loss_gate": {"enabled": False}}})
    assert "another output folder" in str(err.value)
    # a setting added to raysv after the run started: its default continues the run, another value is named
    default = {"finetune": {"epochs": 8, "loss_gate": {"enabled": True, "start_epoch": 2}}}
    check_resumable(settings, {"finetune": {"epochs": 2, "loss_gate": {"enabled": True, "start_epoch": 2}}}, default)
    with pytest.raises(ConfigError, match=r"finetune\.loss_gate\.start_epoch: None → 3"):
        check_resumable(settings, {"finetune": {"epochs": 2, "loss_gate": {"enabled": True, "start_epoch": 3}}},
                        default)
    record.unlink()
    with pytest.raises(ConfigError, match="without a settings record"):
        check_resumable(settings, {"finetune": {"epochs": 2}})


@pytest.mark.slow
def test_second_finetune_with_other_out_and_settings_trains_its_own_model(toy, tmp_path):
    """The reported case: `finetune --out A`, then `finetune --out B` with the gate and correction off."""
    from raysv.inference import load_model
    from raysv.stages.finetune import finetune

    table = pq.read_table(Path(toy.shards) / "manifest.parquet", columns=["utt_index", "speaker"])
    speakers = table.column("speaker").to_pylist()
    names = sorted(set(speakers))
    labels = tmp_path / "labels"
    write_labels(labels, table.column("utt_index").to_numpy(), np.array([names.index(s) for s in speakers], np.int32))
    scratch = "finetune.model.ecapa_init=scratch"
    first = finetune(_cfg(toy, tmp_path, scratch), labels, tmp_path / "A" / "model")
    second = finetune(_cfg(toy, tmp_path, scratch, "finetune.loss_gate.enabled=false",
                           "finetune.label_correction.enabled=false"), labels, tmp_path / "B" / "model")
    a, b = load_training_state(first), load_training_state(second)
    assert [h["epoch"] for h in b["history"]] == [0, 1]  # trained, not A's finished run resumed
    assert {h["worker_pid"] for h in a["history"]}.isdisjoint(h["worker_pid"] for h in b["history"])
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    ea, eb = (load_model(p, device="cpu").embed(wave.numpy()) for p in (first, second))
    assert not np.allclose(ea, eb, atol=1e-4)
    assert all(h["dropped"] == 0 and h["corrected"] == 0 for h in b["history"])  # B's own settings
    cfg = _cfg(toy, tmp_path, scratch)
    storage = Path(train_settings(cfg, "any", first).storage)
    runs = {standalone_run_name(cfg, "finetune", out) for out in (first, second)}
    assert len(runs) == 2 and all((storage / run / "raysv_run.json").is_file() for run in runs)
