"""scripts/slurm/train_aot.sbatch: one launch style, and its resume/requeue decisions, run for
real with fake ``srun``/``scontrol`` on PATH (no SLURM here)."""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "scripts", "slurm", "train_aot.sbatch")

# srun stand-in. status mode: append the command line to $FAKE_LOG, write $FAKE_STATUS (if any)
# to the launcher's --status-file, exit $FAKE_RC. exec mode: run the command as task 0 of a
# one-task step, dropping srun's own options, so the launcher really parses what the script
# passes.
FAKE_SRUN = r"""#!/bin/bash
printf '%s\n' "$*" >> "$FAKE_LOG"
if [[ "${FAKE_MODE:-status}" == exec ]]; then
    while [[ "$1" == --* ]]; do shift; done
    export SLURM_STEP_NUM_TASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 \
        SLURM_STEP_NODELIST=localhost SLURM_STEP_TASKS_PER_NODE=1 SLURM_STEP_NUM_NODES=1
    exec "$@"
fi
args=("$@")
for i in "${!args[@]}"; do
    if [[ "${args[$i]}" == --status-file && -n "${FAKE_STATUS:-}" ]]; then
        printf '%b' "$FAKE_STATUS" > "${args[$((i + 1))]}"
    fi
done
exit "${FAKE_RC:-0}"
"""
FAKE_SCONTROL = r"""#!/bin/bash
printf 'scontrol %s\n' "$*" >> "$FAKE_LOG"
if [[ "$1 $2 $3" == "show hostnames node[01-02]" ]]; then echo node01; echo node02; fi
if [[ "$1 $2 $3" == "show hostnames localhost" ]]; then echo localhost; fi
"""


def executable_lines(path):
    """The script without comments and with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", open(path).read())
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def directives(path):
    return [line.split(None, 1)[1].strip() for line in open(path) if line.startswith("#SBATCH ")]


def test_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", SBATCH], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run(["shellcheck", "-S", "warning", SBATCH], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_one_launch_style_one_task_per_gpu():
    lines = executable_lines(SBATCH)
    launches = [line for line in lines if re.match(r"srun\b", line)]
    assert len(launches) == 1, launches
    srun = launches[0]
    for flag in ("--container-image=", "--container-mounts=", "--kill-on-bad-exit=1"):
        assert flag in srun
    assert "python -u -m nemo_aot.launcher" in srun and "-- train" in srun
    assert not any(re.search(r"torchrun|torch\.distributed\.(run|launch)", line) for line in lines)
    sbatch = directives(SBATCH)
    per_node = [d for d in sbatch if d.startswith("--ntasks-per-node=")]
    gpus = [d for d in sbatch if d.startswith("--gpus-per-node=")]
    assert per_node and gpus and per_node[0].split("=")[1] == gpus[0].split("=")[1]
    assert not any("gpus-per-task" in d or "gpu-bind" in d for d in sbatch)


def test_preemption_directives():
    sbatch = directives(SBATCH)
    signal = [d for d in sbatch if d.startswith("--signal=")]
    # No "B:": the signal must reach the tasks (the trainer), not only the batch shell.
    assert len(signal) == 1 and re.fullmatch(r"--signal=USR1@\d+", signal[0]), signal
    assert "--requeue" in sbatch and "--open-mode=append" in sbatch


@pytest.fixture
def cluster(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    run_dir = tmp_path / "run"

    def submit(*args, **env):
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                "PATH": f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                        f"{os.environ['PATH']}",
                "FAKE_LOG": str(log), "CONTAINER_IMAGE": "/images/nemo-aot.sqsh",
                "RUN_DIR": str(run_dir), "SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "node[01-02]",
                "SLURM_JOB_NUM_NODES": "2", **env}
        proc = subprocess.run(["bash", SBATCH, *args], env=full, capture_output=True, text=True,
                              timeout=120)
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return proc, calls
    submit.run_dir = run_dir
    return submit


def test_srun_gets_container_rendezvous_and_run_dir_overrides(cluster):
    proc, calls = cluster("recipe=llama3_8b", "trainer.max_steps=5",
                          FAKE_STATUS=r"stop_reason=max_steps\nstep=5\ncomplete=true\n")
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "scontrol show hostnames node[01-02]"
    srun = calls[1]
    run_dir = cluster.run_dir
    assert "--container-image=/images/nemo-aot.sqsh" in srun
    assert f"--container-mounts={run_dir}:{run_dir}" in srun
    assert srun.endswith(f"train logging.output_dir={run_dir} checkpoint.dir={run_dir}/checkpoints "
                         "checkpoint.resume=auto checkpoint.save_on_signal=true "
                         "recipe=llama3_8b trainer.max_steps=5")
    assert f"--status-file {run_dir}/launch_status.txt" in srun
    assert "rendezvous node01:10777" in proc.stdout
    assert not any("requeue" in c for c in calls) and "training complete" in proc.stdout


@pytest.mark.parametrize("status, env, requeued, code", [
    (r"stop_reason=signal\nstep=40\ncomplete=false\n", {}, True, 0),
    (r"stop_reason=max_time\nstep=40\ncomplete=false\n", {}, True, 0),
    (r"stop_reason=max_epochs\nstep=90\ncomplete=true\n", {}, False, 0),
    (r"stop_reason=signal\nstep=40\ncomplete=false\n", {"FAKE_RC": "1"}, False, 1),
    (r"stop_reason=signal\nstep=40\ncomplete=false\n", {"SLURM_RESTART_COUNT": "3",
                                                         "MAX_REQUEUES": "3"}, False, 1),
    ("", {}, False, 1),  # the launcher never wrote its status
])
def test_requeue_only_when_stopped_early(cluster, status, env, requeued, code):
    proc, calls = cluster("recipe=demo", FAKE_STATUS=status, **env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("scontrol requeue 777" in calls) == requeued, calls


def test_sigterm_to_the_batch_shell_prevents_the_scripts_own_requeue(cluster, tmp_path):
    # A srun that signals its parent shell the way scancel/preemption would, then stops early.
    slow = tmp_path / "bin" / "srun"
    slow.write_text(FAKE_SRUN.replace('exit "${FAKE_RC:-0}"', 'kill -TERM "$PPID"; exit 0'))
    proc, calls = cluster("recipe=demo",
                          FAKE_STATUS=r"stop_reason=signal\nstep=3\ncomplete=false\n")
    assert proc.returncode == 0, proc.stderr
    assert "not requeueing" in proc.stdout and not any("requeue" in c for c in calls)


def test_missing_settings_are_named(cluster):
    proc, _ = cluster("recipe=demo", RUN_DIR="")
    assert proc.returncode != 0 and "set RUN_DIR" in proc.stderr


def test_dry_run_reaches_the_launcher_with_valid_overrides(cluster):
    """The script's own overrides compose with the user's into a valid config (real launcher,
    one task, CPU): catches renamed config keys and a broken command line."""
    proc, calls = cluster("recipe=demo", "trainer.max_steps=3", "optim.warmup_steps=1",
                          DRY_RUN="1", FAKE_MODE="exec", SLURM_RESTART_COUNT="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nemo-aot launch (dry run): ranks from SLURM job 777" in proc.stdout
    assert f"checkpoints  {cluster.run_dir}/checkpoints (resume auto" in proc.stdout
    assert "TP 1 x PP 1 x DP 1 = 1" in proc.stdout
    assert not any("requeue" in c for c in calls)
