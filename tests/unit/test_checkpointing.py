"""CheckpointManager: atomic saves, keep-last pruning, recovery after kill -9, multi-rank saves,
and the RNG state bundle."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from multirank import run_multirank
from nemo_aot.algorithms.checkpointing import (
    MARKER,
    CheckpointManager,
    capture_rng_state,
    read_marker,
    restore_rng_state,
)


def _writer(text):
    def write(tmp_dir):
        assert os.listdir(tmp_dir) == []  # the payload goes into an empty folder
        with open(os.path.join(tmp_dir, "payload.txt"), "w") as f:
            f.write(text)
    return write


def _payload(path):
    with open(os.path.join(path, "payload.txt")) as f:
        return f.read()


def test_save_is_atomic_and_carries_metadata(tmp_path):
    manager = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    path = manager.save(10, _writer("ten"), {"consumed_samples": 320, "config_hash": "abc"})
    assert os.path.basename(path) == "step_00000010"
    assert sorted(os.listdir(path)) == [MARKER, "payload.txt"] and _payload(path) == "ten"
    meta = read_marker(path)
    assert meta["step"] == 10 and meta["consumed_samples"] == 320 and meta["config_hash"] == "abc"
    assert abs(meta["time"] - time.time()) < 60
    assert os.listdir(tmp_path / "ckpt") == ["step_00000010"]  # no temporary folder left
    latest = manager.latest_valid()
    assert (latest.path, latest.step, latest.metadata["consumed_samples"]) == (path, 10, 320)


def test_keep_last_prunes_oldest(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=2)
    for step in (1, 2, 3, 4, 5):
        manager.save(step, _writer(str(step)))
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000005"]
    assert [c.step for c in manager.complete()] == [4, 5]
    keep_all = CheckpointManager(str(tmp_path), keep_last=None)
    keep_all.save(6, _writer("6"))
    assert [c.step for c in keep_all.complete()] == [4, 5, 6]
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(str(tmp_path), keep_last=0)


def test_resaving_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=3)
    manager.save(7, _writer("first"))
    manager.save(7, _writer("second"))
    assert _payload(manager.latest_valid().path) == "second"
    assert os.listdir(tmp_path) == ["step_00000007"]


def test_latest_valid_ignores_partial_and_invalid_folders(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=5)
    manager.save(6, _writer("six"))
    (tmp_path / ".tmp_step_00000009").mkdir()  # a save killed mid-write
    (tmp_path / ".tmp_step_00000009" / "payload.txt").write_text("partial")
    (tmp_path / ".trash_step_00000002.123").mkdir()  # a prune killed mid-delete
    (tmp_path / "step_00000008").mkdir()  # no marker
    (tmp_path / "step_00000007").mkdir()
    (tmp_path / "step_00000007" / MARKER).write_text("{not json")
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "step_00000005" / MARKER).write_text('{"step": 4}')  # names another step
    latest = manager.latest_valid()
    assert latest.step == 6 and _payload(latest.path) == "six"
    assert not (tmp_path / ".tmp_step_00000009").exists()  # rank 0 cleaned the leftovers
    assert not (tmp_path / ".trash_step_00000002.123").exists()
    assert CheckpointManager(str(tmp_path / "empty")).latest_valid() is None


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    manager = CheckpointManager(str(tmp_path), keep_last=1)
    manager.save(1, _writer("one"))

    def broken(tmp_dir):
        _writer("half")(tmp_dir)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        manager.save(2, broken)
    latest = manager.latest_valid()
    assert latest.step == 1 and _payload(latest.path) == "one"


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    from nemo_aot.algorithms.checkpointing import CheckpointManager
    root, ready = sys.argv[1], sys.argv[2]
    manager = CheckpointManager(root, keep_last=1)
    def write(text, hang):
        def fn(tmp_dir):
            with open(os.path.join(tmp_dir, "payload.txt"), "w") as f:
                f.write(text)
            if hang:
                open(ready, "w").close()
                time.sleep(120)  # killed here, mid-write
        return fn
    manager.save(1, write("one", False), {"consumed_samples": 8})
    manager.save(2, write("two", True), {"consumed_samples": 16})
""")


def test_kill_9_during_write_leaves_previous_checkpoint(tmp_path):
    root, ready = tmp_path / "ckpt", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(root), str(ready)])
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, "the saving process died before the kill"
            assert time.monotonic() < deadline, "the saving process never reached the write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (root / ".tmp_step_00000002").exists()  # the killed save left its partial folder
    manager = CheckpointManager(str(root), keep_last=1)
    latest = manager.latest_valid()
    assert latest.step == 1 and latest.metadata["consumed_samples"] == 8
    assert _payload(latest.path) == "one"
    assert os.listdir(root) == ["step_00000001"]
    manager.save(2, _writer("two again"), {"step": 99})  # the run carries on saving; the
    assert manager.latest_valid().metadata["step"] == 2  # manager's step wins over metadata
    assert manager.latest_valid().step == 2 and os.listdir(root) == ["step_00000002"]


def _multirank_save(root):
    rank = torch.distributed.get_rank()
    manager = CheckpointManager(root, keep_last=1)

    def write(tmp_dir):
        with open(os.path.join(tmp_dir, f"shard_rank{rank}.txt"), "w") as f:
            f.write(str(rank))

    first = manager.save(3, write, {"consumed_samples": 12})
    files_seen = sorted(os.listdir(first))
    manager.save(4, write, {"consumed_samples": 16})
    latest = manager.latest_valid()

    def fails_on_rank1(tmp_dir):
        write(tmp_dir)
        if rank == 1:
            raise RuntimeError("rank 1 write failed")

    try:
        manager.save(5, fails_on_rank1)
        error = None
    except RuntimeError as err:
        error = str(err)
    return files_seen, latest.step, latest.path, manager.latest_valid().step, error


def test_multirank_save(tmp_path):
    root = str(tmp_path / "ckpt")
    results = run_multirank(_multirank_save, world_size=2, args=(root,), timeout=120)
    for files_seen, step, path, after_failure, _ in results:
        assert files_seen == [MARKER, "shard_rank0.txt", "shard_rank1.txt"]
        assert step == 4 and path == os.path.join(root, "step_00000004")
        assert after_failure == 4  # the failed save did not replace the checkpoint
    assert "rank 1 write failed" not in results[0][4] and "another rank failed" in results[0][4]
    assert "rank 1 write failed" in results[1][4]
    assert sorted(os.listdir(root)) == ["step_00000004"]  # keep_last=1 pruned step 3


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1]
    assert torch.equal(expected[2], again[2])
    saved = torch.load(_save(state), weights_only=False)  # survives serialization
    restore_rng_state(saved)
    assert random.random() == expected[0]


def _save(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


class _Fails:
    """Stands in for model and optimizer: what ``RunCheckpointer._template`` asks of them."""

    def sharded_state_dict(self, *args, **kwargs):
        return {}


def test_a_checkpoint_from_a_newer_megatron_core_that_fails_to_load_says_why(tmp_path,
                                                                             monkeypatch):
    """The marker names the megatron-core that wrote the checkpoint; when loading fails and that
    release is newer than the installed one, the error says so and what to do (an older one,
    or none recorded, keeps megatron's own error)."""
    from megatron.core import dist_checkpointing

    from nemo_aot.algorithms import checkpointing as ck

    def broken_load(*args, **kwargs):
        raise KeyError("optimizer.param_groups: unexpected key in the checkpoint")

    monkeypatch.setattr(dist_checkpointing, "load", broken_load)
    monkeypatch.setattr(ck, "sharded_rng_state", lambda: {})
    runner = ck.RunCheckpointer(ck.CheckpointManager(str(tmp_path)), _Fails(), _Fails(), None,
                                None, config_text="", config_hash="", tokenizer_dir="")
    installed = ck.megatron_core_version()
    newer = f"0.{int(installed.split('.')[1]) + 1}.0"
    saved = ck.SavedCheckpoint(str(tmp_path / "step_00000003"), 3, {"megatron_core": newer})
    with pytest.raises(RuntimeError, match=rf"written by megatron-core {newer}, and this "
                                           rf"environment has the older {installed}.*>= {newer}"):
        runner.restore(saved, trainer=None)
    for metadata in ({"megatron_core": installed}, {"megatron_core": "0.15.0"}, {}):
        with pytest.raises(KeyError, match="unexpected key"):
            runner.restore(ck.SavedCheckpoint(saved.path, 3, metadata), trainer=None)


def test_the_recorded_megatron_core_is_the_installed_distribution():
    from importlib import metadata

    from nemo_aot.algorithms.checkpointing import megatron_core_version

    assert megatron_core_version() == metadata.version("megatron-core")
    assert "+" not in megatron_core_version()  # no commit of a surrounding git repository
