"""raysv's local Ray clusters: Ray's own lines on a driver's stdout and stderr stay out of the console (everything
else passes through), and idle worker processes outlive a stage of another runtime environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def test_ray_noise_goes_to_the_log_and_the_rest_through(tmp_path):
    log = tmp_path / "run.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, time
        logging.basicConfig(level=logging.DEBUG, filename={str(log)!r})
        from raysv.runtime import divert_native_log_lines
        divert_native_log_lines()
        print("python line", file=sys.stderr)
        os.write(2, b"[2026-12-02 00:57:22,653 E 28786 28786] core_worker.cc:2465: Actor noise\\n")
        print("\\x1b[33m(raylet)\\x1b[0m WARNING: 22 PYTHON worker processes have been started on node", file=sys.stderr)
        print("\\x1b[33m(raylet)\\x1b[0m A worker died or was killed", file=sys.stderr)
        os.write(2, b"[2026-12-02 00:57:22,6")  # a native line written in two pieces
        time.sleep(0.1)
        os.write(2, b"53 W 1 1] x.cc:1: split\\n[kept] not Ray's format\\n")
        sys.stderr.write("\\r 10%|##  |"); sys.stderr.flush(); time.sleep(0.1); sys.stderr.write("\\r 20%|### |\\n")
        print("on stdout")
        print("\x1b[33m(raylet)\x1b[0m WARNING: 20 PYTHON worker processes have been started on node: 0b68")
        print("stdout again")
        sys.exit("the last line, at exit")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)  # bytes: keep the \r
    assert done.stdout == b"on stdout\nstdout again\n"  # the raylet's notices come to a driver on stdout
    assert done.stderr.decode().split("\n") == [
        "python line", "\x1b[33m(raylet)\x1b[0m A worker died or was killed", "[kept] not Ray's format",
        "\r 10%|##  |\r 20%|### |", "the last line, at exit", ""]
    logged = log.read_text()
    assert "core_worker.cc:2465: Actor noise" in logged and "worker processes have been started" in logged
    assert "x.cc:1: split" in logged and "20 PYTHON worker processes" in logged



def test_stages_find_their_worker_processes_again():
    """Idle workers of one runtime environment survive a stage of another (training's data tasks
    against the driver's): Ray's default keeps one process per logical CPU and kills the rest.
    A cluster of its own, started by raysv (the test session's holds the idle workers of every test)."""
    script = textwrap.dedent("""
        import json, os, time
        import ray
        from raysv.runtime import RayConfig, ensure_ray

        ensure_ray(RayConfig(num_cpus=4))

        @ray.remote(num_cpus=1)
        def pid():
            time.sleep(0.5)
            return os.getpid()

        first = set(ray.get([pid.remote() for _ in range(4)]))
        other = pid.options(runtime_env={"env_vars": {"RAYSV_TEST_STAGE": "other"}})
        second = set(ray.get([other.remote() for _ in range(4)]))
        time.sleep(3)  # Ray kills surplus idle workers after a second
        again = set(ray.get([pid.remote() for _ in range(4)]))
        print(json.dumps({"first": sorted(first), "second": sorted(second), "again": sorted(again)}))
    """)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    pids = {k: set(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}
    assert not pids["first"] & pids["second"]
    assert len(pids["again"] & pids["first"]) >= min(len(pids["first"]), len(pids["again"])) - 1, pids
