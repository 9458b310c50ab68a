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
