"""Checkpoints survive kill -9, resume bit for bit, and SIGTERM saves and exits 0."""

import os
import signal

from conftest import curve, history, run_cli, start_cli, train_args, wait_for

STEPS = ["trainer.max_steps=16", "checkpoint.save_interval=4", "trainer.val_check_interval=8"]


def test_kill_9_then_resume_matches_uninterrupted_run(small_data, init_nemo, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_cli(["train", *train_args(small_data, ref_dir, f"init_from={init_nemo}", *STEPS)])
    args = ["train", *train_args(small_data, run_dir, f"init_from={init_nemo}", *STEPS)]
    proc = start_cli(args)
    marker = run_dir / "checkpoints" / "step_00000004" / "COMPLETE.json"
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run_dir / "checkpoints" / "step_00000016").exists(), "run finished before the kill"
    resumed = run_cli(args)
    assert "resumed from" in resumed.stdout + resumed.stderr
    ref, got = history(ref_dir), history(run_dir)
    assert [r["step"] for r in got] == list(range(1, 17))
    assert curve(got) == curve(ref)  # bit for bit on CPU
    assert curve(history(run_dir, "validation")) == curve(history(ref_dir, "validation"))


def test_sigterm_saves_a_checkpoint_and_exits_0(small_data, init_nemo, tmp_path):
    args = ["train", *train_args(small_data, tmp_path, f"init_from={init_nemo}",
                                 "trainer.max_steps=500", "checkpoint.save_interval=1000",
                                 "checkpoint.export_nemo_at_end=false")]
    proc = start_cli(args)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(history(tmp_path)) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    assert len(saved) == 1 and saved[0].startswith("step_"), saved
    step = int(saved[0].split("_")[1])
    assert 2 <= step < 500
    assert (tmp_path / "checkpoints" / saved[0] / "COMPLETE.json").exists()
    assert history(tmp_path)[-1]["step"] == step


def test_resume_with_the_distributed_optimizer_matches_uninterrupted_run(small_data, init_nemo,
                                                                         tmp_path):
    """The production recipes' optimizer (ZeRO-1) at DP2 on torch's Adam: megatron builds the
    loading template from optimizer state a fresh optimizer lacks, and restores Adam's step
    count as one shared tensor. Also: no validation data (data.validation_path=null)."""
    import shutil

    extra = ["trainer.max_steps=6", "checkpoint.save_interval=3", "data.validation_path=null",
             "optim.use_distributed_optimizer=true", "alignment.sort_scope=micro",
             "optim.weight_decay=0.1"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run_cli(["train", *train_args(small_data, ref_dir, f"init_from={init_nemo}", *extra)],
            nproc=2)
    shutil.copytree(ref_dir, run_dir)  # as if stopped right after the step-3 checkpoint
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    (run_dir / "aot_policy.nemo").unlink()
    resumed = run_cli(["train", *train_args(small_data, run_dir, f"init_from={init_nemo}",
                                            *extra)], nproc=2)
    assert "resumed from" in resumed.stdout + resumed.stderr
    got, ref = history(run_dir), history(ref_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert curve(got) == curve(ref)  # bit for bit: moments, master weights and step count
    assert history(ref_dir, "validation") == []
