"""Several runs of one config: per-stage mean and spread against numpy, the rule that a stage holds, bad input named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raysv.errors import InputError
from raysv.evaluation.seeds import format_spread, seed_spread

# EER per run (rows) and stage (columns), in the order raysv run writes them.
STAGES = ["round_0/dino", "baseline/simclr", "round_1/finetune", "round_2/finetune", "round_2/lmft",
          "reference/finetune", "reference/lmft"]
EERS = np.array([[0.140, 0.200, 0.112, 0.100, 0.101, 0.080, 0.078],
                 [0.150, 0.210, 0.118, 0.125, 0.099, 0.084, 0.081],
                 [0.136, 0.190, 0.104, 0.112, 0.107, 0.079, 0.080]])


def _run(folder: Path, eers, stages=STAGES, dev=0.3, test="toy") -> Path:
    """A run folder whose results.json has the rows raysv run writes (``dev`` listed first, then the test list)."""
    rows = [{"name": n, "eer": e, "minutes": 1.0, "trials": {"dev": {"eer": dev}, test: {"eer": e}}}
            for n, e in zip(stages, eers)]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"run": folder.name, "stages": rows}))
    return folder


def test_means_spreads_changes_and_the_ratio_match_numpy(tmp_path: Path) -> None:
    runs = [_run(tmp_path / f"s{i}", row) for i, row in enumerate(EERS)]
    spread = seed_spread(runs)
    assert [s["name"] for s in spread["stages"]] == STAGES
    for j, stage in enumerate(spread["stages"]):
        assert stage["mean"] == pytest.approx(EERS[:, j].mean())
        assert stage["sd"] == pytest.approx(EERS[:, j].std(ddof=1))
        assert (stage["min"], stage["max"]) == pytest.approx((EERS[:, j].min(), EERS[:, j].max()))
    by_name = {s["name"]: s for s in spread["stages"]}
    # Paired changes between consecutive self-supervised stages; the reference rows have none.
    for before, after in (("round_0/dino", "round_1/finetune"), ("round_1/finetune", "round_2/finetune"),
                          ("round_2/finetune", "round_2/lmft")):  # the baseline is not in the chain
        d = EERS[:, STAGES.index(after)] - EERS[:, STAGES.index(before)]
        assert by_name[after]["change"]["vs"] == before
        assert by_name[after]["change"]["mean"] == pytest.approx(d.mean())
        assert by_name[after]["change"]["sd"] == pytest.approx(d.std(ddof=1))
    for name in ("round_0/dino", "baseline/simclr", "reference/finetune"):
        assert "change" not in by_name[name] and "holds" not in by_name[name]
    assert spread["trials"] == "toy"
    ratios = EERS[:, 4] / EERS[:, 6]
    assert spread["ratio"]["self_supervised"] == "round_2/lmft" and spread["ratio"]["supervised"] == "reference/lmft"
    assert spread["ratio"]["mean"] == pytest.approx(ratios.mean())
    assert spread["ratio"]["sd"] == pytest.approx(ratios.std(ddof=1))


def test_a_stage_holds_within_the_previous_stages_sd_and_not_beyond(tmp_path: Path) -> None:
    stages = ["round_0/dino", "round_1/finetune", "round_2/finetune"]
    r1 = np.array([0.110, 0.120, 0.100])  # sd 0.01
    # Round 2's mean 0.009 above round 1's, with a spread of its own far above round 1's: holds
    # only by round 1's sd (0.010), not by round 2's (0.05) or the paired change's.
    within = r1.mean() + 0.009 + np.array([-0.05, 0.05, 0.0])
    beyond = r1.mean() + 0.011 + np.array([-0.05, 0.05, 0.0])
    ok = seed_spread([_run(tmp_path / f"a{i}", [0.15, r1[i], within[i]], stages) for i in range(3)])
    bad = seed_spread([_run(tmp_path / f"b{i}", [0.15, r1[i], beyond[i]], stages) for i in range(3)])
    assert ok["stages"][1]["sd"] == pytest.approx(0.01)
    assert [s.get("holds") for s in ok["stages"]] == [None, True, True]
    assert [s.get("holds") for s in bad["stages"]] == [None, True, False]
    assert format_spread(bad).splitlines()[-1].endswith("WORSE") and "WORSE" not in format_spread(ok)
    assert "ratio" not in ok  # no supervised reference in these runs


def test_another_trial_list_and_stages_not_in_every_run(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", EERS[0], dev=0.2)
    b = _run(tmp_path / "b", EERS[1][:4], STAGES[:4], dev=0.4)  # stopped after round 2's fine-tune
    spread = seed_spread([a / "results.json", b], trials="dev")
    assert [s["name"] for s in spread["stages"]] == STAGES[:4]
    assert spread["stages"][0]["mean"] == pytest.approx(0.3)
    assert spread["missing"] == ["reference/finetune", "reference/lmft", "round_2/lmft"]
    assert "left out (not in every run): reference/finetune" in format_spread(spread)


def test_bad_input_is_named(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", EERS[0])
    with pytest.raises(InputError, match="at least two runs"):
        seed_spread([a])
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "nothing"))):
        seed_spread([a, tmp_path / "nothing"])
    with pytest.raises(InputError, match="same run as"):
        seed_spread([a, a / "results.json"])
    other = _run(tmp_path / "vox", EERS[1], test="vox1_o")
    with pytest.raises(InputError, match="different trial lists first.*toy.*vox1_o"):
        seed_spread([a, other])
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "results.json").write_text(json.dumps({"stages": [{"name": "round_0/dino", "eer": "n/a"}]}))
    with pytest.raises(InputError, match="round_0/dino has an EER that is not a number"):
        seed_spread([a, tmp_path / "text"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    with pytest.raises(InputError, match="broken/results.json: not JSON"):
        seed_spread([a, tmp_path / "broken"])
    with pytest.raises(InputError, match="no trial list 'vox1_o'.*dev, toy"):
        seed_spread([a, other], trials="vox1_o")


def test_cli_prints_the_table_and_the_same_figures_as_json(tmp_path: Path) -> None:
    runs = [str(_run(tmp_path / f"s{i}", row)) for i, row in enumerate(EERS)]
    table = subprocess.run([sys.executable, "-m", "raysv.cli", "seeds", *runs], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "round_2/lmft" in table.stdout and f"= {(EERS[:, 4] / EERS[:, 6]).mean():.2f} ±" in table.stdout
    as_json = subprocess.run([sys.executable, "-m", "raysv.cli", "seeds", *runs, "--json"], capture_output=True,
                             text=True)
    assert json.loads(as_json.stdout) == json.loads(json.dumps(seed_spread(runs)))
    missing = subprocess.run([sys.executable, "-m", "raysv.cli", "seeds", runs[0], str(tmp_path / "none")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and str(tmp_path / "none") in missing.stderr
