"""Config schema: YAML loading, overrides, errors that name the key."""

from pathlib import Path

import pytest

from raysv.config import ConfigError
from raysv.pipeline import plan, stage_settings
from raysv.run_config import Config, load_config, round_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_follow_the_reference():
    cfg = Config()
    assert cfg.dino.encoder.channels == 1024 and cfg.dino.encoder.mfa_channels == 3072
    assert cfg.dino.head.out_dim == 65536
    assert cfg.finetune.loss.margin == 0.2 and cfg.finetune.loss.scale == 30
    assert cfg.lmft.margin == 0.5 and cfg.lmft.crop_seconds == 6


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if "sweep" not in p.name))
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / name)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["dino.epochs=3", "cluster.k2=null", "finetune.loss.margin=0.3", "name=x"])
    assert cfg.dino.epochs == 3 and cfg.cluster.k2 is None
    assert cfg.finetune.loss.margin == pytest.approx(0.3) and cfg.name == "x"


def test_unknown_key_named():
    with pytest.raises(ConfigError, match=r"dino\.epoch: unknown key"):
        load_config(None, ["dino.epoch=3"])


def test_wrong_type_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  loss:\n    margin: big\n")
    with pytest.raises(ConfigError, match=r"finetune\.loss\.margin: expected a number"):
        load_config(path)


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="k2"):
        load_config(None, ["cluster.k1=10", "cluster.k2=10"])
    with pytest.raises(ConfigError, match=r"cluster\.k2_fallback \(10\) must be smaller than cluster\.k1 \(10\)"):
        load_config(None, ["cluster.k1=10", "cluster.k2=auto", "cluster.k2_fallback=10"])
    with pytest.raises(ConfigError, match=r"cluster\.k1 and cluster\.k2 are both null"):
        load_config(None, ["cluster.k1=null", "cluster.k2=null"])
    assert load_config(None, ["cluster.k1=null", "cluster.k2=auto", "cluster.k2_fallback=10000"]).cluster.k1 is None
    with pytest.raises(ConfigError, match="ray.use_gpu"):
        load_config(None, ["ray.use_gpu=maybe"])
    with pytest.raises(ConfigError, match=r"dino\.diversity\.covariance: must be >= 0, got -0\.1"):
        load_config(None, ["dino.diversity.covariance=-0.1"])
    with pytest.raises(ConfigError, match=r"lmft\.start_weight: must be in \[0, 1\), got 1\.0"):
        load_config(None, ["lmft.start_weight=1.0"])


def test_round_overrides():
    cfg = load_config(None, ["rounds.count=2", "rounds.overrides={2: {cluster: {k1: 300, k2: 50}}}"])
    assert round_config(cfg, 1).cluster.k1 == cfg.cluster.k1
    assert round_config(cfg, 2).cluster.k1 == 300
    with pytest.raises(ConfigError, match=r"rounds\.overrides\.2: cluster\.k3: unknown key"):
        load_config(None, ["rounds.count=2", "rounds.overrides={2: {cluster: {k3: 1}}}"])
    with pytest.raises(ConfigError, match=r"rounds\.overrides\.0: rounds are numbered from 1"):
        load_config(None, ["rounds.overrides={0: {cluster: {k1: 3}}}"])
    # A later round's settings stay in the config when a run is shortened from the command line.
    short = load_config(None, ["rounds.count=1", "rounds.overrides={2: {cluster: {k1: 30000}}}"])
    assert round_config(short, 2).cluster.k1 == 30000


def test_setting_added_after_a_stage_ran_is_no_change_at_its_default(tmp_path):
    """A run made before a setting existed continues; the same setting away from its default is named."""
    from raysv.config import differences
    from raysv.pipeline import ConfigChanged, RunState, check_unchanged, completed_stage_changes, plan, stage_config

    assert differences({"a": 1}, {"a": 1, "new": 0.0}, {"a": 9, "new": 0.0}) == []
    assert differences({"a": 1}, {"a": 1, "new": 0.5}, {"a": 9, "new": 0.0}) == ["new: None → 0.5"]
    assert differences({"a": 1}, {"a": 1, "new": 0.0}) == ["new: None → 0.0"]  # no defaults: strict

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"runs={tmp_path}"])
    state = RunState(cfg.run_dir)
    stage = next(s for s in plan(cfg) if s.id == "round_0/cluster")
    old = stage_config(cfg, stage)
    del old["cluster"]["keep"]  # recorded by a raysv without cluster.keep
    state.record(stage, {"config": old})
    check_unchanged(cfg, plan(cfg), state)
    halved = load_config(ROOT / "configs" / "demo.yaml", [f"runs={tmp_path}", "cluster.keep=0.5"])
    with pytest.raises(ConfigChanged, match=r"round_0/cluster .*\n  cluster\.keep: None → 0\.5"):
        check_unchanged(halved, plan(halved), state)
    assert completed_stage_changes(cfg, cfg) == [] and completed_stage_changes(cfg, halved) == ["round_0/cluster"]


def test_demo_counts_after_round_one_and_gates_round_one_only():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.rounds.count == 4
    assert round_config(cfg, 1).cluster.k2 == 120
    for r in (2, 3, 4):
        cluster = round_config(cfg, r).cluster
        assert (cluster.k2, cluster.k2_factor, cluster.k2_fallback) == ("auto", 1.0, 120), r
    gated = [(round_config(cfg, r).finetune.loss_gate.enabled, round_config(cfg, r).finetune.label_correction.enabled)
             for r in (1, 2, 3, 4)]
    assert gated == [(True, True), (False, False), (False, False), (False, False)]
    stages = {stage.id: stage for stage in plan(cfg)}
    lmft = stage_settings(cfg, stages["round_4/lmft"]).finetune  # the large margin takes round 4's settings
    assert not lmft.loss_gate.enabled and not lmft.label_correction.enabled
    assert cfg.lmft.start_weight == 0.5 and Config().lmft.start_weight == 0.0  # the reference keeps the end
    tube = load_config(ROOT / "configs" / "demo.yaml", [], [str(ROOT / "configs" / "demo_tube.yaml")])
    assert tube.rounds.count == 4 and "tube-data" in tube.data.shards
