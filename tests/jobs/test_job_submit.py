"""`ray job submit` of the pipeline job to a real local head that keeps token authentication on.

Only one Ray cluster should live on a machine at a time, so the test pauses the session's
shared local cluster, starts its own head (``ray start --head --block``, dashboard on
127.0.0.1, 8 logical CPUs, a temp dir and ports of its own), and afterwards stops exactly
the processes it started and brings the shared cluster back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line names ``text`` (here: this test's Ray temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _stop_head(proc: subprocess.Popen, temp: Path) -> None:
    """End the head this test started: its `ray start --block` process group, then any stray of its temp dir."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.time() + 20
    while (strays := _processes_mentioning(str(temp))) and time.time() < deadline:
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _ray(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def head(toy, tmp_path):
    import ray

    ray.shutdown()  # the shared session's cluster; restored below
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token = temp / "auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    gcs, dash, client, listen, grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "8", "--temp-dir", str(temp), "--disable-usage-stats",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--port", str(gcs), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(listen),
           "--dashboard-agent-grpc-port", str(grpc), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr)]
    log = (tmp_path / "head.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited {proc.returncode}:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
            if _ray(["job", "list", "--address", address], env).returncode == 0:
                break
            if time.time() > deadline:
                raise AssertionError(f"the job server never answered:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(3)
        yield SimpleNamespace(address=address, env=env, log=tmp_path / "head.log")
    finally:
        _stop_head(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)  # as conftest's


def test_pipeline_job_on_a_token_protected_head(head, toy, tmp_path):
    # Without the token the job server refuses the client.
    bare = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    refused = _ray(["job", "list", "--address", head.address], bare)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    runs = (tmp_path / "job_runs").resolve()  # outside the uploaded working directory
    overrides = tiny_overrides(toy, runs) + ["name=job", "dino.epochs=1"]
    entry = ["python", "jobs/pipeline.py", "--config", "configs/demo.yaml", *overrides, "--until", "round_0/dino"]
    started = time.time()
    while True:
        # The job server answers before the node's agent has registered with it; until then a
        # submission is refused with "No available agent" and nothing is started, so try again.
        job_id = f"raysv-test-{uuid.uuid4().hex[:8]}"
        submitted = _ray(["job", "submit", "--address", head.address, "--working-dir", str(ROOT),
                          "--submission-id", job_id, "--", *entry], head.env, timeout=900)
        if "No available agent" not in submitted.stderr + submitted.stdout or time.time() - started > 180:
            break
        time.sleep(5)
    seconds = time.time() - started
    status = _ray(["job", "status", "--address", head.address, job_id], head.env)
    logs = submitted.stdout[-4000:] + submitted.stderr[-2000:]
    assert submitted.returncode == 0 and f"Job '{job_id}' succeeded" in status.stdout, f"{status.stdout}\n{logs}"
    print(f"submitted job: {seconds:.0f} s")

    run_dir = runs / "job"
    results = json.loads((run_dir / "results.json").read_text())
    assert [row["name"] for row in results["stages"]] == ["round_0/dino"]
    state = json.loads((run_dir / "state.json").read_text())
    assert list(state["stages"]) == ["round_0/dino"]
    assert (run_dir / "round_0/dino/model/model.pt").is_file()

    db = sqlite3.connect(runs / "mlflow.db")
    parents = [r[0] for r in db.execute("select run_uuid from tags where key='raysv.kind' and value='pipeline'")]
    assert parents == [state["mlflow_parent"]]
    (child,) = [r[0] for r in db.execute("select run_uuid from tags where key='raysv.stage' and value='round_0/dino'")]
    assert db.execute("select value from tags where run_uuid=? and key='mlflow.parentRunId'", (child,)).fetchone()[0] == parents[0]
    statuses = dict(db.execute("select run_uuid, status from runs").fetchall())
    assert statuses[parents[0]] == "FINISHED" and statuses[child] == "FINISHED"
    assert db.execute("select count(*) from metrics where run_uuid=? and key='loss'", (child,)).fetchone()[0] >= 1
