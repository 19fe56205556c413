"""Shards damaged after `prepare` are named before any stage reads them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raysv.artifacts.shards import check_shards, shard_files


@pytest.fixture
def damaged(toy, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(toy.shards, shards)
    parts = sorted(Path(p) for p in shard_files(shards))
    assert len(parts) >= 2
    parts[0].unlink()  # a shard lost
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])  # a node died while it was copied
    return shards, parts


def test_missing_and_truncated_shards_are_all_named(toy, damaged):
    check_shards(toy.shards)  # the intact folder passes
    shards, parts = damaged
    with pytest.raises(FileNotFoundError) as err:
        check_shards(shards)
    text = str(err.value)
    assert f"{parts[0]}: missing" in text and f"{parts[1]}: unreadable" in text
    assert "raysv prepare --overwrite" in text and str(parts[2]) not in text


def test_training_command_refuses_damaged_shards_before_training(damaged, tmp_path):
    shards, parts = damaged
    done = subprocess.run([sys.executable, "-m", "raysv.cli", "train-dino", "--config",
                           str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"),
                           "--out", str(tmp_path / "model"), f"runs={tmp_path / 'runs'}", f"data.shards={shards}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert parts[0].name in done.stderr and parts[1].name in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint_*"))
