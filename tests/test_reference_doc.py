"""docs/reference.md: every row filled, and every setting it gives for configs/voxceleb2.yaml is that config's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from raysv.config import to_dict
from raysv.run_config import load_config

ROOT = Path(__file__).resolve().parents[1]
SETTING = re.compile(r"`([a-z_][a-z0-9_.]*) = ([^`]+)`")


def _rows() -> list[list[str]]:
    rows = []
    for line in (ROOT / "docs" / "reference.md").read_text().splitlines():
        if not line.startswith("|") or set(line) <= {"|", "-", " "} or line.startswith("| setting"):
            continue
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def test_every_row_is_filled():
    rows = _rows()
    assert len(rows) >= 40
    for row in rows:
        assert len(row) == 5 and all(row), row
        assert row[4].startswith(("same", "differs")), row  # the verdict, and why when it differs


def test_voxceleb2_config_holds_every_setting_the_table_gives():
    cfg = to_dict(load_config(ROOT / "configs" / "voxceleb2.yaml"))
    checked = 0
    for row in _rows():
        for key, text in SETTING.findall(row[3]):
            value = cfg
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{key}: no such config key"
                value = value[part]
            expected = yaml.safe_load(text)
            if isinstance(expected, float) or isinstance(value, float):
                assert value == pytest.approx(expected), key
            else:
                assert value == expected, f"{key}: the config has {value!r}, docs/reference.md says {expected!r}"
            checked += 1
    assert checked >= 60
