"""The tests' tiny pipeline (one round) under a seeded schedule of SIGKILLs of the driver and of Ray workers.

Each kill waits until the stage it names is live (its ``=== stage ===`` line in ``run.log``, no
completion marker yet, and for training stages an epoch checkpoint), then comes a seeded fraction
of a second later. A killed driver is started again, as a user or a job retry would; a killed
worker is left to Ray (actor restart, Ray Train's ``max_failures``). The run must finish, every
stage once, nothing lost or repeated, and the re-run stages must equal the same stages run
uninterrupted from the same inputs. ``RAYSV_CHAOS_SEED`` picks the schedule's timing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import tiny_overrides
from raysv.artifacts.checkpoint import load_training_state
from raysv.artifacts.embeddings import read_embeddings
from raysv.artifacts.labels import read_labels
from raysv.pipeline import plan, run_pipeline
from raysv.run_config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
TIME_LIMIT_S = 400  # the whole chaos run; on 2 cores it takes about a third of that


@dataclass(frozen=True)
class Kill:
    target: str  # "driver", "embedding actor" or "training worker"
    stage: str
    checkpoints: int = 0  # a training stage: wait for this many epoch checkpoints first
    window_s: float = 0.3  # the kill comes a seeded 0..window_s after the stage is seen live
    truncate: bool = False  # then cut the newest checkpoint short, as a node dying mid-write leaves it


SCHEDULE = (
    Kill("driver", "round_0/dino", checkpoints=2, window_s=0.5, truncate=True),  # resumes from the older one
    Kill("driver", "round_0/eval"),
    Kill("driver", "round_0/extract"),
    Kill("embedding actor", "round_0/extract"),  # the re-run's extraction loses its actor
    Kill("driver", "round_0/cluster", window_s=0.05),
    Kill("training worker", "round_1/finetune", checkpoints=1),  # ray.max_failures=1: no resubmission
)
WORKER_TITLES = {"embedding actor": "ray::MapWorker(MapBatches(EmbeddingActor))", "training worker": "ray::RayTrainWorker"}


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, …)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _descends_from_this_session(pid: int) -> bool:
    """Whether ``pid`` descends from this process: a worker of the Ray cluster this test session started,
    not of another Ray cluster on the same machine, whose workers this test must never kill."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(_stat_fields(pid)[1])
        except OSError:
            return False
    return False


def _processes(title: str) -> dict[int, float]:
    """``{pid: start time (epoch s)}`` of this session's live processes whose Ray title starts with ``title``."""
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime"))
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(title.encode()):
                continue
            started = boot + int(_stat_fields(int(proc.name))[19]) / ticks
        except OSError:
            continue
        if _descends_from_this_session(int(proc.name)):
            found[int(proc.name)] = started
    return found


class Chaos:
    """Runs ``raysv run`` through the schedule, restarting the driver after each driver kill."""

    def __init__(self, cfg, overrides: list[str], seed: int):
        import ray

        self.cfg, self.rng = cfg, np.random.default_rng(seed)
        self.cmd = [sys.executable, "-m", "raysv.cli", "run", "--config", str(ROOT / "configs" / "demo.yaml"),
                    *overrides]
        self.env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        self.console = open(cfg.run_dir.parent / "chaos_console.txt", "w")
        self.deadline = time.time() + TIME_LIMIT_S
        self.hits: list[dict] = []
        self.drivers = 0

    def start(self) -> None:
        log = self.cfg.layout.log
        self.log_offset = log.stat().st_size if log.exists() else 0
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, start_new_session=True,
                                     stdout=self.console, stderr=subprocess.STDOUT)
        self.drivers += 1

    def train_folder(self, stage: str) -> Path:
        return Path(self.cfg.run_dir) / "ray" / f"{self.cfg.name}-{stage.replace('/', '-')}"

    def _live_since(self, kill: Kill) -> float | None:
        """When this driver started the stage, if it is running now and has its checkpoints."""
        layout = self.cfg.layout
        if layout.marker(kill.stage).exists():
            raise AssertionError(f"{kill.stage} finished before {kill.target} could be killed in it")
        try:
            with open(layout.log) as f:
                f.seek(self.log_offset)
                text = f.read()
        except OSError:
            return None
        at = text.find(f"=== {kill.stage} ===")
        if at < 0:
            return None
        if kill.checkpoints:
            folder = self.train_folder(kill.stage)
            try:  # an epoch checkpoint counts once Ray Train's snapshot lists it
                listed = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
            except (OSError, ValueError, KeyError):
                return None
            if len(listed) < kill.checkpoints:
                return None
        return time.mktime(time.strptime(text[max(0, at - 100):at].splitlines()[-1][:19], "%Y-%m-%d %H:%M:%S"))

    def strike(self, kill: Kill) -> None:
        live = None
        while live is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"raysv run ended (exit {self.proc.returncode}) before the kill in {kill.stage}")
            if time.time() > self.deadline:
                raise AssertionError(f"the chaos run passed its {TIME_LIMIT_S} s limit waiting for {kill.stage}")
            live = self._live_since(kill)
            if live is not None and kill.target != "driver":
                # a worker process of this stage: titled as such and started once the stage was
                started = {pid: t for pid, t in _processes(WORKER_TITLES[kill.target]).items() if t >= live - 1}
                live = live if started else None
            time.sleep(0.02)
        time.sleep(self.rng.uniform(0.0, kill.window_s))
        if self.cfg.layout.marker(kill.stage).exists():
            raise AssertionError(f"{kill.stage} finished before {kill.target} could be killed in it")
        if kill.target == "driver":
            pid = self.proc.pid
            os.killpg(pid, signal.SIGKILL)
            self.proc.wait()
        else:
            started = {p: t for p, t in _processes(WORKER_TITLES[kill.target]).items() if t >= live - 1}
            pid = max(started, key=started.get)
            os.kill(pid, signal.SIGKILL)  # raises if it is already gone: the kill must hit a live process
        finished = self.cfg.layout.marker(kill.stage).exists()
        self.hits.append({"target": kill.target, "stage": kill.stage, "pid": pid, "stage_done": finished})
        if kill.truncate:  # the newest checkpoint Ray Train has registered, the one it will resume from
            snapshot = self.train_folder(kill.stage) / "checkpoint_manager_snapshot.json"
            newest = json.loads(snapshot.read_text())["checkpoint_results"][-1]
            path = self.train_folder(kill.stage) / newest["checkpoint_dir_name"] / "training.pt"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            self.hits[-1].update(truncated=str(path), truncated_epoch=int(newest["metrics"]["epoch"]))
        if kill.target == "driver":
            self.start()

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.time()))
        finally:
            self.console.close()


@pytest.fixture(scope="module")
def chaos(toy, tmp_path_factory):
    runs = tmp_path_factory.mktemp("chaos")
    overrides = tiny_overrides(toy, runs) + ["rounds.count=1", "name=chaos", "dino.epochs=3", "finetune.epochs=2", "lmft.enabled=false",
                                             "reference.supervised=false", "ray.max_failures=1"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    seed = int(os.environ.get("RAYSV_CHAOS_SEED", "0"))
    run = Chaos(cfg, overrides, seed)
    started = time.time()
    run.start()
    try:
        for kill in SCHEDULE:
            run.strike(kill)
        code = run.finish()
    finally:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
    assert code == 0, (cfg.run_dir.parent / "chaos_console.txt").read_text()[-3000:]
    return cfg, overrides, run, time.time() - started


def test_every_kill_hit_a_live_process_of_its_stage(chaos):
    cfg, _, run, seconds = chaos
    assert [(h["target"], h["stage"]) for h in run.hits] == [(k.target, k.stage) for k in SCHEDULE]
    assert not any(h["stage_done"] for h in run.hits), run.hits
    assert run.drivers == 1 + sum(k.target == "driver" for k in SCHEDULE)
    assert seconds < TIME_LIMIT_S
    extract = json.loads((cfg.run_dir / "round_0/extract/extract.json").read_text())
    actor = next(h["pid"] for h in run.hits if h["target"] == "embedding actor")
    assert actor not in extract["actor_pids"] and extract["actor_pids"], "the killed actor was replaced"


def test_every_stage_once_nothing_lost_or_repeated(chaos):
    cfg, _, _, _ = chaos
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert [row["name"] for row in results["stages"]] == ["round_0/dino", "round_1/finetune"]
    state = json.loads((cfg.run_dir / "state.json").read_text())
    assert sorted(state["stages"]) == sorted(s.id for s in plan(cfg))
    manifest = pq.read_table(Path(cfg.data.shards) / "manifest.parquet").column("utt_index").to_numpy()
    utt, _ = read_embeddings(cfg.run_dir / "round_0/extract/embeddings.parquet")
    assert np.array_equal(np.sort(utt), np.sort(manifest)) and len(np.unique(utt)) == len(utt)  # each once
    labelled, _ = read_labels(cfg.run_dir / "round_0/cluster/labels.parquet")
    assert np.array_equal(np.sort(labelled), np.sort(manifest))
    for stage, epochs in (("round_0/dino", cfg.dino.epochs), ("round_1/finetune", cfg.finetune.epochs)):
        history = load_training_state(cfg.run_dir / stage / "model")["history"]
        assert [h["epoch"] for h in history] == list(range(epochs)), stage  # none repeated, none skipped
    for trials in ("toy", "dev"):
        metrics = json.loads((cfg.run_dir / "round_0/eval/metrics.json").read_text())[trials]
        scores = (cfg.run_dir / "round_0/eval" / trials / "scores.txt").read_text().splitlines()
        assert metrics["trials"] == len(scores) > 0


def test_killed_training_resumes_from_its_checkpoint_or_carries_on(chaos):
    cfg, _, run, _ = chaos
    dino = load_training_state(cfg.run_dir / "round_0/dino/model")["history"]
    # the newest registered checkpoint, after epoch k (0-based), was cut short: the second driver resumed
    # from the one before it, redoing epoch k on, and said so naming the file
    k = run.hits[0]["truncated_epoch"]
    console = (cfg.run_dir.parent / "chaos_console.txt").read_text()
    assert f"{run.hits[0]['truncated']} is unreadable" in console and f"instead (after epoch {k})" in console
    first, second = {h["worker_pid"] for h in dino[:k]}, {h["worker_pid"] for h in dino[k:]}
    assert len(first) == len(second) == 1 and first != second
    finetune = load_training_state(cfg.run_dir / "round_1/finetune/model")["history"]
    killed = next(h["pid"] for h in run.hits if h["target"] == "training worker")
    assert finetune[0]["worker_pid"] == killed and finetune[1]["worker_pid"] != killed
    # the worker was replaced inside the same driver: the last driver is the one that was running then
    assert run.hits[-1]["target"] == "training worker"


def test_rerun_stages_equal_an_uninterrupted_run(chaos, tmp_path):
    """Eval, extract and cluster, each re-run after a kill, against the same stages run straight through."""
    cfg, overrides, _, _ = chaos
    ref_cfg = load_config(ROOT / "configs" / "demo.yaml", overrides + [f"runs={tmp_path}", "name=straight"])
    shutil.copytree(cfg.run_dir / "round_0/dino", ref_cfg.run_dir / "round_0/dino")
    state = json.loads((cfg.run_dir / "state.json").read_text())
    (ref_cfg.run_dir / "state.json").write_text(json.dumps({"stages": {"round_0/dino": state["stages"]["round_0/dino"]}}))
    run_pipeline(ref_cfg, until="round_0/cluster")
    utt_a, emb_a = read_embeddings(cfg.run_dir / "round_0/extract/embeddings.parquet")
    utt_b, emb_b = read_embeddings(ref_cfg.run_dir / "round_0/extract/embeddings.parquet")
    order_a, order_b = np.argsort(utt_a), np.argsort(utt_b)
    assert np.array_equal(utt_a[order_a], utt_b[order_b])
    np.testing.assert_allclose(emb_a[order_a], emb_b[order_b], atol=1e-6)
    labels_a = dict(zip(*map(list, read_labels(cfg.run_dir / "round_0/cluster/labels.parquet"))))
    labels_b = dict(zip(*map(list, read_labels(ref_cfg.run_dir / "round_0/cluster/labels.parquet"))))
    assert labels_a == labels_b
    for trials in ("toy", "dev"):
        a = json.loads((cfg.run_dir / "round_0/eval/metrics.json").read_text())[trials]
        b = json.loads((ref_cfg.run_dir / "round_0/eval/metrics.json").read_text())[trials]
        assert a["eer"] == b["eer"] and a["min_dcf_0.01"] == pytest.approx(b["min_dcf_0.01"], abs=1e-9)
