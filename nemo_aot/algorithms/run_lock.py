"""One writer per output folder: ``<output_dir>/.nemo_aot.lock``.

Rank 0 of a run creates the lock file exclusively (``O_CREAT | O_EXCL``) before anything is
written, with the owner's host, pid, process start time and SLURM job id, refreshes its time
stamp from a background thread every ``HEARTBEAT_S`` and removes it when the run ends. A second
run on the same folder is refused naming the owner. A lock is stale, and taken over with a
warning, when its owner is gone:

* same host: no process with its pid, or one that started at another time (a reused pid) -
  what a kill -9 leaves;
* the same SLURM job id as this process (a requeued job: its earlier incarnation is gone);
* another host: the time stamp is older than ``STALE_S`` (its heartbeat stopped).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

LOCK_FILE = ".nemo_aot.lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux ``/proc``), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: dict, mtime: float, now: Optional[float] = None) -> Optional[str]:
    """Why the lock ``owner`` wrote is stale, or None while its run may still be alive."""
    now = time.time() if now is None else now
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job:
        return f"it belongs to an earlier run of this SLURM job ({job})"
    if owner.get("host") == socket.gethostname():
        pid = owner.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return f"process {pid} no longer exists"
        started = owner.get("process_start")
        if started is not None and _start_time(pid) not in (None, started):
            return f"pid {pid} now belongs to another process"
        return None
    if now - mtime > STALE_S:
        return f"its heartbeat stopped {now - mtime:.0f} s ago"
    return None


class RunLock:
    """The output folder's lock, held by rank 0 of a run (``acquire``/``release``)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lock or raise ValueError naming the run that holds it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "process_start": _start_time(os.getpid()), "started": time.time(),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            self._thread = threading.Thread(target=self._beat, name="nemo_aot-lock",
                                            daemon=True)
            self._thread.start()
            return
        raise ValueError(f"could not take {self.path}: other runs keep creating it")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
            mtime = os.path.getmtime(self.path)
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            owner, mtime = {}, 0.0  # unreadable: a lock killed mid-write, or not ours
        reason = stale_reason(owner, mtime) if owner else "it is unreadable"
        if reason is None:
            started = time.strftime("%Y-%m-%d %H:%M:%S",
                                    time.localtime(owner.get("started", 0)))
            job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
            raise ValueError(
                f"{os.path.dirname(self.path)} is in use by another run: host "
                f"{owner.get('host')}, pid {owner.get('pid')}{job}, started {started}. Two runs "
                f"on one logging.output_dir would overwrite each other's checkpoints; use "
                f"another logging.output_dir, or wait for that run to end. If it is gone (its "
                f"node died), delete {self.path}")
        log.warning("taking over the stale lock %s (%s)", self.path, reason)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        self.held = False
        try:
            with open(self.path) as f:
                owner = json.load(f)
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                os.remove(self.path)
        except (OSError, ValueError):
            pass


__all__ = ["RunLock", "LOCK_FILE", "stale_reason"]
