"""The command line: subcommands end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raysv.artifacts.labels import num_classes, read_labels
from raysv.cli import build_parser


def test_labels_command_writes_true_speakers(toy, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "raysv.cli", "labels", "--shards", str(toy.shards),
                          "--out", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    utt, labels = read_labels(tmp_path)
    speakers = pq.read_table(toy.shards / "manifest.parquet").to_pydict()
    by_utt = dict(zip(speakers["utt_index"], speakers["speaker"]))
    assert sorted(utt.tolist()) == sorted(by_utt)
    for u, lab in zip(utt, labels):  # one label per speaker, the same for all its utterances
        assert (labels[[by_utt[int(v)] == by_utt[int(u)] for v in utt]] == lab).all()
    assert num_classes(labels) == len(set(by_utt.values())) and "6 speakers" in out


def test_cluster_k1_takes_a_number_or_none(capsys) -> None:
    """``--k1 none``: Ward of the utterances themselves; anything else but a number is a usage error naming it."""
    base = ["cluster", "--embeddings", "e", "--out", "o", "--k1"]
    assert build_parser().parse_args([*base, "none"]).k1 is None
    assert build_parser().parse_args([*base, "320"]).k1 == 320
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*base, "many"])
    assert done.value.code == 2 and "--k1: expected a number or none, got 'many'" in capsys.readouterr().err
    args = build_parser().parse_args([*base, "none", "--lda-iterations", "3", "--lda-dim", "32"])
    assert (args.lda_iterations, args.lda_dim) == (3, 32)
    assert build_parser().parse_args([*base, "none"]).lda_iterations == 0  # off unless asked for
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*base, "none", "--lda-iterations", "-1"])
    assert done.value.code == 2 and "--lda-iterations: expected a whole number >= 0, got '-1'" in capsys.readouterr().err
