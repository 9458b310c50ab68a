"""Faults through the launched CLI, on one short shared run: resuming with another config,
a corrupted newest checkpoint, a second writer on the same output folder. (The table-driven
checks of each class run without training: tests/unit/test_faults_*.py.)"""

import json
import math
import os
import shutil

import pytest

from conftest import history, run_cli, train_args

pytestmark = pytest.mark.xdist_group("faults_e2e")

BASE = ["trainer.max_steps=4", "checkpoint.save_interval=2", "checkpoint.keep_last=3",
        "trainer.val_check_interval=100", "checkpoint.export_nemo_at_end=false"]


@pytest.fixture(scope="module")
def stopped_run(small_data, init_nemo, tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4 (no export): copied by each test."""
    out = tmp_path_factory.mktemp("faults") / "run"
    run_cli(["train", *train_args(small_data, out, f"init_from={init_nemo}", *BASE)])
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _args(small_data, out, init_nemo, *extra):
    return ["train", *train_args(small_data, out, f"init_from={init_nemo}", *BASE, *extra)]


def test_resume_with_a_changed_learning_rate_is_refused_naming_it(stopped_run, small_data,
                                                                   init_nemo, tmp_path):
    out = _copy(stopped_run, tmp_path)
    proc = run_cli(_args(small_data, out, init_nemo, "trainer.max_steps=6", "optim.lr=1e-2"),
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "optim.lr: 0.005 -> 0.01" in proc.stderr
    assert "trainer.max_steps" not in proc.stderr.splitlines()[-1]  # extending is not refused
    assert "checkpoint.allow_config_change=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r["step"] for r in history(out)] == [1, 2, 3, 4]  # nothing trained


def test_the_override_continues_with_the_new_config_and_records_it(stopped_run, small_data,
                                                                     init_nemo, tmp_path):
    out = _copy(stopped_run, tmp_path)
    proc = run_cli(_args(small_data, out, init_nemo, "trainer.max_steps=6", "optim.lr=1e-2",
                         "checkpoint.allow_config_change=true"))
    assert "resumed from" in proc.stdout + proc.stderr
    steps = history(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # the new schedule (peak 1e-2, cosine to the demo's min_lr 1e-4 over 6 steps, warmup 1)
    # from the checkpoint's step on; megatron would keep the stored peak and length
    min_lr, ratio = 1e-4, (5 - 1) / (6 - 1)
    expected = min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-2 - min_lr)
    assert steps[4]["lr"] == pytest.approx(expected, rel=1e-6)
    (entry,) = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert entry["resumed_at_step"] == 4
    assert entry["changes"]["optim.lr"] == [0.005, 0.01]
    assert entry["changes"]["trainer.max_steps"] == [4, 6]
    assert entry["allowed_by"] == "checkpoint.allow_config_change"
    with open(os.path.join(out, "checkpoints", "step_00000006", "COMPLETE.json")) as f:
        marker = json.load(f)
    assert marker["resumed_with_config_changes"]["changes"]["optim.lr"] == [0.005, 0.01]


@pytest.mark.slow  # ~130 s on 2 busy cores: two runs and a refused one
def test_ctrl_c_saves_exits_130_and_resumes_at_that_step_and_a_second_writer_is_refused(
        small_data, init_nemo, tmp_path):
    import signal
    import socket

    from conftest import start_cli, wait_for

    long = ["trainer.max_steps=500", "checkpoint.save_interval=1000"]
    first = start_cli(_args(small_data, tmp_path, init_nemo, *long))
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(history(tmp_path)) >= 1, first)
    # a second run on the same output folder, while the first trains
    second = run_cli(_args(small_data, tmp_path, init_nemo, *long), check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = first.communicate(timeout=180)
    assert first.returncode == 130, out[-4000:]
    assert "KeyboardInterrupt" not in out and "Traceback" not in out
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    assert len(saved) == 1, saved
    stopped = int(saved[0].split("_")[1])
    assert history(tmp_path)[-1]["step"] == stopped  # no step lost since the last save
    assert not (tmp_path / ".nemo_aot.lock").exists()
    # resumed at that step (extending max_steps is a resume-free change)
    resumed = run_cli(_args(small_data, tmp_path, init_nemo,
                            f"trainer.max_steps={stopped + 2}", "checkpoint.save_interval=1000"))
    assert f"at step {stopped}" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in history(tmp_path)] == list(range(1, stopped + 3))


@pytest.mark.slow  # ~100 s on 2 busy cores: an export and a resumed run
def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(stopped_run, small_data,
                                                                 init_nemo, tmp_path):
    out = _copy(stopped_run, tmp_path)
    newest = out / "checkpoints" / "step_00000004"
    shard = max((p for p in newest.rglob("*") if p.is_file() and p.suffix == ".distcp"),
                key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    export = run_cli(["export", "--checkpoint", str(newest), "--out", str(tmp_path / "p.nemo")],
                     check=False)
    assert export.returncode == 2 and f"checkpoint {newest} is damaged" in export.stderr
    assert shard.name in export.stderr and "Traceback" not in export.stderr
    proc = run_cli(_args(small_data, out, init_nemo))
    log = proc.stdout + proc.stderr
    assert f"checkpoint {newest} is damaged" in log and "resuming from" in log
    assert "resumed from" in log and "at step 2" in log
    assert [r["step"] for r in history(out)] == [1, 2, 3, 4]
