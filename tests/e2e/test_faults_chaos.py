"""Chaos: SIGINT, SIGTERM and SIGKILL at random points of a 2-rank run, then a resume that must
train exactly the uninterrupted run; and kill -9 in the middle of `nemo-aot export`, which must
leave no partial .nemo. SIGINT and SIGTERM go to torchrun's process group (a terminal's Ctrl-C, a
scheduler's signal; torchrun forwards them to the ranks, which run in sessions of their own);
SIGKILL comes twice: to every process of the run at once (a scheduler killing the job's cgroup),
and to torchrun alone (a user's `kill -9`, the out-of-memory killer), when the orphaned ranks
must stop by themselves, saving as for SIGTERM. The seed is printed; set NEMO_AOT_CHAOS_SEED to
replay one."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, curve, env, history, kill_job, run_cli, start_cli, train_args

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faults_chaos")]

EXTRA = ["trainer.max_steps=9", "checkpoint.save_interval=3", "trainer.val_check_interval=100",
         "checkpoint.export_nemo_at_end=false"]


def _steps(out):
    try:
        return len(history(out))
    except (OSError, ValueError):
        return 0


def _interrupt(proc, out, how, after_steps, timeout=300):
    """Interrupt the run ``how`` (a signal to torchrun's group, ``SIGKILL`` to every process of
    the run, ``SIGKILL launcher`` to torchrun alone) once metrics show ``after_steps`` steps (0:
    as soon as it started); return the exit code (None: the run ended before)."""
    import psutil

    deadline = time.monotonic() + timeout
    while _steps(out) < after_steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None:
        proc.communicate()
        return None
    if how == "SIGKILL":
        kill_job(proc)
        return proc.returncode
    launcher = psutil.Process(proc.pid)
    run = [launcher, *launcher.children(recursive=True)]
    if how == "SIGKILL launcher":
        launcher.kill()
    else:
        os.killpg(proc.pid, getattr(signal, how))
    try:
        proc.communicate(timeout=240)  # the ranks hold its output open until they exit
        _, alive = psutil.wait_procs(run, timeout=60)
        assert not alive, f"{how}: {alive} outlived the run"
    finally:
        for member in run:  # nothing of the run may outlive it
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
    return proc.returncode


def test_signals_at_random_points_of_a_two_rank_run_then_resume_is_exact(small_data, init_nemo,
                                                                          tmp_path):
    seed = int(os.environ.get("NEMO_AOT_CHAOS_SEED", random.randrange(1 << 16)))
    print(f"chaos seed {seed}")
    rng = random.Random(seed)
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_cli(["train", *train_args(small_data, ref, f"init_from={init_nemo}", *EXTRA)], nproc=2)
    args = ["train", *train_args(small_data, run, f"init_from={init_nemo}", *EXTRA)]
    done = 0
    for how in rng.sample(["SIGINT", "SIGTERM", "SIGKILL", "SIGKILL launcher"], 4):
        # at start-up or after a step, never later than step 7: every interruption meets a run
        # with steps still to train (9 in all), not one that has finished
        after = min(done + rng.randint(0, 2), 7)
        code = _interrupt(start_cli(args, nproc=2), run, how, after)
        done = _steps(run)
        print(f"{how} after step {after}: exit {code}, {done} steps logged")
        assert code is not None and done < 9, f"seed {seed}: the run ended before {how}"
    run_cli(args, nproc=2)
    assert [r["step"] for r in history(run)] == list(range(1, 10)), f"seed {seed}"
    assert curve(history(run)) == curve(history(ref)), f"seed {seed}"
    assert not (run / ".nemo_aot.lock").exists()

    # kill -9 while exporting: no partial .nemo; the same command then writes a whole one
    from nemo_aot.models.nemo_format import read_nemo_config

    out = tmp_path / "policy.nemo"
    export = ["export", "--checkpoint", str(run / "checkpoints"), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "nemo_aot.cli", *export], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    time.sleep(rng.uniform(1.0, 12.0))
    code = _interrupt(proc, run, "SIGKILL", 0)
    if code is not None:  # killed before it finished: nothing, or nothing half-written
        assert not out.exists(), f"seed {seed}: a partial .nemo after kill -9"
    run_cli(export)
    assert read_nemo_config(str(out))[0].num_layers == 2
