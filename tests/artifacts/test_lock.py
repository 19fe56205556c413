"""One run per directory: a live holder refuses a second run, an abandoned lock is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from raysv.artifacts.lock import RunLock, RunLocked


def test_a_live_holder_is_named_and_refuses_a_second_lock(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path, interval=0.1):
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=rf"in use by process {os.getpid()} on {socket.gethostname()}"):
            RunLock(path).acquire()
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(0.35)
        assert json.loads(path.read_text())["heartbeat"] > first  # the heartbeat is refreshed
    assert not path.exists()  # released


def test_a_stale_lock_from_another_host_is_taken_over(tmp_path, caplog):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "node-that-died", "pid": 4242, "token": "x", "heartbeat": time.time() - 600}))
    with caplog.at_level(logging.WARNING, logger="raysv"), RunLock(path, stale_after=120):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taking over" in caplog.text and "node-that-died" in caplog.text and "600 s old" in caplog.text


def test_a_fresh_lock_from_another_host_is_respected(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "other-node", "pid": 4242, "token": "x", "heartbeat": time.time()}))
    with pytest.raises(RunLocked, match="process 4242 on other-node"):
        RunLock(path).acquire()


def test_a_dead_process_on_this_host_is_taken_over(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(done.stdout), "token": "x",
                                "heartbeat": time.time()}))
    with RunLock(path):
        assert json.loads(path.read_text())["pid"] == os.getpid()
