"""Partial writes, full disks, interrupts and a second writer, without training: the checkpoint
folders (``CheckpointManager``), the output folder's lock (``RunLock``) and the signal handler.
The launched versions are in tests/e2e/test_faults_e2e.py."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import pytest

from nemo_aot.algorithms import checkpointing, run_lock
from nemo_aot.algorithms.checkpointing import (
    CheckpointManager,
    DiskFullError,
    find_checkpoint,
)
from nemo_aot.algorithms.run_lock import LOCK_FILE, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _payload(nbytes=1000):
    def write(folder):
        os.makedirs(os.path.join(folder, "model"))
        with open(os.path.join(folder, "model", "weights.distcp"), "wb") as f:
            f.write(os.urandom(nbytes))
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            f.write("a: 1\n")
    return write


@pytest.fixture
def three_saves(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=3, fsync=False)
    for step in (2, 4, 6):
        manager.save(step, _payload(), {"config_hash": "x"})
    return manager


def _truncate(manager, step):
    path = os.path.join(manager.step_dir(step), "model", "weights.distcp")
    with open(path, "r+b") as f:
        f.truncate(100)


def _drop_file(manager, step):
    os.remove(os.path.join(manager.step_dir(step), "config.yaml"))


def _garble_marker(manager, step):
    with open(os.path.join(manager.step_dir(step), "COMPLETE.json"), "w") as f:
        f.write('{"step": 6, "fi')


DAMAGE = {"truncated file": (_truncate, "weights.distcp has 100 bytes, 1000 were written"),
          "missing file": (_drop_file, "config.yaml is missing"),
          "half-written marker": (_garble_marker, "COMPLETE.json is missing or unreadable")}


def test_every_checkpoint_carries_a_manifest_of_its_files(three_saves):
    marker = checkpointing.read_marker(three_saves.step_dir(6))
    assert marker["files"] == {os.path.join("model", "weights.distcp"): 1000, "config.yaml": 5}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(three_saves, damage,
                                                                       caplog):
    hurt, why = DAMAGE[damage]
    hurt(three_saves, 6)
    with caplog.at_level("WARNING", logger="nemo_aot.algorithms.checkpointing"):
        latest = three_saves.latest_valid()
    assert latest.step == 4
    (warning,) = [r.getMessage() for r in caplog.records]
    assert three_saves.step_dir(6) in warning and why in warning
    assert three_saves.step_dir(4) in warning
    assert os.path.isdir(three_saves.step_dir(6))  # left for the user to look at
    # export: the newest good one from the run folder; the damaged one by name is refused
    assert find_checkpoint(three_saves.root) == three_saves.step_dir(4)
    if damage != "half-written marker":
        with pytest.raises(ValueError, match=f"is damaged: .*{why.split()[0]}"):
            find_checkpoint(three_saves.step_dir(6))
    else:
        with pytest.raises(ValueError, match="unreadable"):
            find_checkpoint(three_saves.step_dir(6))


def test_checkpoints_without_a_manifest_still_load(three_saves):
    path = os.path.join(three_saves.step_dir(6), "COMPLETE.json")
    with open(path) as f:
        marker = json.load(f)
    del marker["files"]  # written by an older version
    with open(path, "w") as f:
        json.dump(marker, f)
    assert three_saves.latest_valid().step == 6


def _full_disk(folder):
    _payload(500)(folder)
    raise OSError(errno.ENOSPC, "No space left on device", os.path.join(folder, "x.distcp"))


def _full_disk_wrapped(folder):
    try:
        _full_disk(folder)
    except OSError as err:
        raise RuntimeError("worker failed writing a shard") from err


@pytest.mark.parametrize("write", [_full_disk, _full_disk_wrapped], ids=["oserror", "wrapped"])
def test_a_full_disk_says_what_where_and_how_much_and_loses_nothing(three_saves, write):
    with pytest.raises(DiskFullError) as err:
        three_saves.save(8, write, {})
    text = str(err.value)
    assert three_saves.root in text and "step 8" in text
    assert f"checkpoint step 6 ({three_saves.step_dir(6)}) is intact" in text
    assert "takes about" in text and "free now" in text
    assert isinstance(err.value, ValueError)  # the CLI prints it as one line, exit 2
    assert [c.step for c in three_saves.complete()] == [2, 4, 6]
    assert not [n for n in os.listdir(three_saves.root) if n.startswith(".tmp")]


def test_resuming_on_a_still_full_disk_says_how_much_to_free(three_saves, monkeypatch):
    assert three_saves.free_space_problem() is None
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 200))
    text = three_saves.free_space_problem()
    assert three_saves.root in text and "200" not in text.split("free")[0][-3:]
    assert "a checkpoint of this run (step 6) takes" in text and "Free at least" in text


# --------------------------------------------------------------------------- two writers


def test_a_second_run_on_the_folder_is_refused_naming_host_and_pid(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    try:
        with pytest.raises(ValueError) as err:
            RunLock(str(tmp_path)).acquire()
        text = str(err.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}" in text
        assert "logging.output_dir" in text
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = RunLock(str(tmp_path))
    second.acquire()  # free again
    second.release()


def _write_lock(folder, **owner):
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "started": time.time(), **owner}))
    return path


def test_a_lock_left_by_kill_9_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_lock(tmp_path, pid=gone.pid)
    lock = RunLock(str(tmp_path))
    with caplog.at_level("WARNING", logger="nemo_aot.algorithms.run_lock"):
        lock.acquire()
    assert f"process {gone.pid} no longer exists" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_killed_owner_process_group_frees_its_lock(tmp_path):
    """The owner is a real process holding the lock; kill -9 its group, then take over."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from nemo_aot.algorithms.run_lock import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        print("held", flush=True)
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {owner.pid}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    lock.release()


STALE = [
    ("other host, heartbeat stopped", dict(host="node-b", pid=1), 3600, None, True),
    ("other host, alive", dict(host="node-b", pid=1), 10, None, False),
    ("same SLURM job requeued", dict(host="node-b", pid=1, slurm_job_id="77"), 10, "77", True),
    ("other SLURM job", dict(host="node-b", pid=1, slurm_job_id="76"), 10, "77", False),
    ("reused pid", dict(pid=os.getpid(), process_start="1"), 10, None, True),
    ("this very process", dict(pid=os.getpid()), 10, None, False),
]


@pytest.mark.parametrize("owner,age,job,stale", [s[1:] for s in STALE], ids=[s[0] for s in STALE])
def test_stale_lock_rule(owner, age, job, stale, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    if job:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    owner = {"host": socket.gethostname(), **owner}
    now = time.time()
    reason = run_lock.stale_reason(owner, now - age, now)
    assert (reason is not None) == stale, reason


# --------------------------------------------------------------------------- Ctrl-C


_HANDLER = textwrap.dedent(f"""
    import os, signal, sys, time
    sys.path.insert(0, {ROOT!r})
    from nemo_aot.algorithms.signals import PreemptionHandler
    with PreemptionHandler() as h:
        print("ready", flush=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if h.requested:
                print("saw", h.signal_name, flush=True)
                time.sleep(float(sys.argv[1]))
                break
            time.sleep(0.01)
    print("saved", flush=True)
""")


def test_ctrl_c_is_a_stop_like_sigterm_and_a_second_one_aborts():
    once = subprocess.Popen([sys.executable, "-c", _HANDLER, "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert once.stdout.readline().strip() == "ready"
    once.send_signal(signal.SIGINT)
    out, err = once.communicate(timeout=30)
    assert once.returncode == 0 and out.split() == ["saw", "SIGINT", "saved"]
    assert "Ctrl-C again to abort" in err and "Traceback" not in err

    twice = subprocess.Popen([sys.executable, "-c", _HANDLER, "20"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert twice.stdout.readline().strip() == "ready"
    twice.send_signal(signal.SIGINT)
    assert twice.stdout.readline().split() == ["saw", "SIGINT"]
    twice.send_signal(signal.SIGINT)  # at once: the same Ctrl-C forwarded (torchrun), ignored
    time.sleep(1.5)
    assert twice.poll() is None
    twice.send_signal(signal.SIGINT)
    out, err = twice.communicate(timeout=30)
    assert twice.returncode == 130 and "saved" not in out
    assert "aborting now, without saving" in err
