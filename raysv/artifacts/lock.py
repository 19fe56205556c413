"""One run per directory: a lock file with its holder's host and pid, kept fresh by a heartbeat.

It must work where run directories live on a shared file system (a cluster's EFS) and two
drivers may run on different hosts, so liveness cannot be asked of the operating system
alone: the holder rewrites the lock's heartbeat every ``interval`` seconds, and a lock
whose heartbeat is older than ``stale_after`` counts as abandoned (its holder died with
its node). On the holder's own host a dead pid is abandoned at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from raysv.errors import InputError

log = logging.getLogger("raysv")

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


class RunLocked(InputError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(path): …`` holds ``path`` (e.g. ``<run>/run.lock``) for the block."""

    def __init__(self, path: str | Path, interval: float = HEARTBEAT_S, stale_after: float = STALE_AFTER_S):
        self.path = Path(path)
        self.interval = float(interval)
        self.stale_after = float(stale_after)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "heartbeat": time.time()}

    def _write(self, record: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _abandoned(self, record: dict[str, Any]) -> str | None:
        """Why ``record``'s holder no longer holds the lock, or None when it is alive."""
        age = time.time() - float(record.get("heartbeat", 0))
        if age > self.stale_after:
            return f"its last heartbeat is {age:.0f} s old"
        if record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1))):
            return f"process {record.get('pid')} has ended"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.close(fd)
        except FileExistsError:
            record = self.holder()
            if record is not None:
                why = self._abandoned(record)
                if why is None:
                    raise RunLocked(
                        f"{self.path.parent} is in use by process {record.get('pid')} on {record.get('host')} "
                        f"(lock {self.path}, heartbeat {time.time() - float(record['heartbeat']):.0f} s ago); "
                        "wait for it to finish, or stop it"
                    ) from None
                log.warning("taking over %s from process %s on %s: %s", self.path, record.get("pid"),
                            record.get("host"), why)
        self._write(self._record())
        time.sleep(0.05)
        if (self.holder() or {}).get("token") != self.token:  # another process took it in the same instant
            record = self.holder() or {}
            raise RunLocked(f"{self.path.parent} was taken by process {record.get('pid')} on {record.get('host')}")
        self._thread = threading.Thread(target=self._beat, name="raysv-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if (self.holder() or {}).get("token") != self.token:
                log.warning("%s was taken over by another process", self.path)
                return
            self._write(self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
        if (self.holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
