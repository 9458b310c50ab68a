"""nemo_aot.launcher end to end in one process: layout checks against the config, the dry-run
report and command, the status file, and the in-process launch path (training stubbed)."""

import argparse
import atexit
import os
import re
import shlex
import shutil
import tempfile

import pytest

from config_stubs import config_only_nemo, model_group
from nemo_aot import launcher

# The 70B checkpoint's architecture (its model_config.yaml only): the layout is checked on it.
_STUBS = tempfile.mkdtemp(prefix="launcher_layout_")
atexit.register(shutil.rmtree, _STUBS, ignore_errors=True)
DATA = [f"init_from={config_only_nemo(model_group('llama3_70b'), _STUBS)}",
        "data.train_path=/lustre/p/train.jsonl", "data.validation_path=/lustre/p/val.jsonl"]


@pytest.fixture
def job(monkeypatch):
    """Replace the launcher-relevant environment with a fake SLURM job step. The launcher
    exports RANK/WORLD_SIZE/...: setenv first so that monkeypatch removes them afterwards."""
    torch_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    for key in {*torch_keys, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))}:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setattr(launcher, "resolve_hostnames", launcher.expand_nodelist)

    def step(nodes, per_node, rank, nodelist="gpu[001-016]", **extra):
        hosts = launcher.expand_nodelist(nodelist)[:nodes]
        env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
               "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank // per_node),
               "SLURM_LOCALID": str(rank % per_node), "SLURM_STEP_NUM_NODES": str(nodes),
               "SLURM_STEP_NODELIST": ",".join(hosts),
               "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})", **extra}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return step


def run(capsys, *argv):
    code = launcher.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_reports_the_70b_layout_and_a_runnable_command(job, capsys):
    job(8, 8, 0, SLURM_GPUS_ON_NODE="8")
    train = ["train", "recipe=llama3_70b", *DATA]
    code, out, err = run(capsys, "--dry-run", "--", *train)
    assert code == 0, err
    assert "ranks from SLURM job 4242" in out
    assert "TP 8 x PP 4 x DP 2 = 64 (sequence parallel on" in out
    assert "rendezvous   gpu001:" + str(10000 + 4242) in out
    assert "global 128 = micro 1 x DP 2 x 64 accumulation step(s)" in out
    assert "sort scope global" in out and "warning" not in out
    command = shlex.split(out.split("command", 1)[1])
    env = dict(word.split("=", 1) for word in command[:7])
    assert env == {"RANK": "0", "WORLD_SIZE": "64", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8",
                   "NODE_RANK": "0", "MASTER_ADDR": "gpu001", "MASTER_PORT": str(10000 + 4242)}
    assert command[7:] == ["python", "-u", "-m", "nemo_aot.cli", *train]


def test_dry_run_on_other_ranks_is_one_line_with_coordinates(job, capsys):
    job(8, 8, 13)
    code, out, _ = run(capsys, "--dry-run", "--", "train", "recipe=llama3_70b", *DATA)
    assert code == 0
    assert out.strip() == ("nemo-aot launch (dry run): rank 13/64 on node 1 (gpu002) local 5: "
                           "tp 5 dp 1 pp 0")


@pytest.mark.parametrize("nodes, per_node, extra, args, match", [
    (16, 4, {}, ["recipe=llama3_70b"], "pass trainer.num_nodes=16 trainer.devices=4"),
    (2, 8, {}, ["recipe=llama3_70b", "trainer.devices=null"],
     "world size 16 is not divisible by tensor_model_parallel_size .8. x "
     "pipeline_model_parallel_size .4. = 32"),
    (1, 8, {"SLURM_GPUS_ON_NODE": "4"}, ["recipe=llama3_8b"], "8 tasks per node but 4 GPUs"),
    (1, 8, {"CUDA_VISIBLE_DEVICES": "0"}, ["recipe=llama3_8b"], "drop --gpus-per-task"),
    (2, 8, {}, ["recipe=llama3_8b", "trainer.num_nodes=2", "trainer.global_batch_size=100"],
     "trainer.global_batch_size=100 must be a multiple"),
])
def test_inconsistent_layouts_fail_with_the_fix(job, capsys, nodes, per_node, extra, args, match):
    job(nodes, per_node, 3 if "CUDA_VISIBLE_DEVICES" in extra else 0, **extra)
    code, out, err = run(capsys, "--dry-run", "--", "train", *args, *DATA)
    assert code == 2 and out == ""
    assert err.startswith("nemo-aot launch: error: ")
    assert re.search(match, err), err


def test_tensor_parallel_across_nodes_is_a_warning(job, capsys):
    job(2, 1, 0)
    code, out, _ = run(capsys, "--dry-run", "--", "train", "recipe=demo",
                       "parallel.tensor_model_parallel_size=2",
                       "trainer.global_batch_size=8", "trainer.micro_batch_size=2")
    assert code == 0
    assert "TP 2 x PP 1 x DP 1 = 2" in out
    assert "warning      tensor-parallel groups of 2 span nodes" in out


@pytest.mark.parametrize("argv, match", [
    (["--", "score", "--model", "x"], "the launcher runs training"),
    (["--"], "got nothing"),
    (["--", "train", "--print-config"], "unsupported train option"),
])
def test_only_train_is_launched(job, capsys, argv, match):
    code, _, err = run(capsys, "--dry-run", *argv)
    assert code == 2 and match in err


def test_launch_exports_ranks_then_trains_and_records_the_outcome(job, capsys, monkeypatch,
                                                                  tmp_path):
    from nemo_aot.algorithms import run as run_module

    job(2, 2, 0, nodelist="localhost,localhost")
    seen = {}

    def fake_training(run):
        cfg = run.config
        seen["env"] = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                  "MASTER_ADDR", "MASTER_PORT")}
        seen["status"] = (tmp_path / "status.txt").read_text()
        seen["layout"] = (cfg.parallel.tensor_model_parallel_size, cfg.trainer.global_batch_size)
        return run_module.RunResult(cfg.logging.output_dir, 7, "signal", None, None, [])

    monkeypatch.setattr(launcher, "run_training", fake_training)
    status = tmp_path / "status.txt"
    code, _, err = run(capsys, "--status-file", str(status), "--", "train", "recipe=demo",
                       "parallel.tensor_model_parallel_size=2", "trainer.global_batch_size=8")
    assert code == 0, err
    assert seen["env"] == {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "localhost", "MASTER_PORT": str(10000 + 4242)}
    assert seen["status"].startswith("stop_reason=running\n")
    assert seen["layout"] == (2, 8)
    assert status.read_text() == "stop_reason=signal\nstep=7\ncomplete=false\njob_id=4242\n"
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("reason, complete", [("max_steps", "true"), ("max_epochs", "true"),
                                              ("signal", "false"), ("max_time", "false")])
def test_status_file_marks_only_finished_runs_complete(tmp_path, reason, complete):
    path = tmp_path / "sub" / "status.txt"
    launcher.write_status(str(path), reason, 10, None)
    assert f"complete={complete}\n" in path.read_text()


def test_status_of_a_run_stopped_before_its_first_step(tmp_path):
    path = tmp_path / "status.txt"
    launcher.write_status(str(path), "signal", None, "7")
    assert path.read_text() == "stop_reason=signal\nstep=\ncomplete=false\njob_id=7\n"


def test_register_adds_a_launch_subcommand():
    parser = argparse.ArgumentParser(prog="nemo-aot")
    launcher.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["launch", "--dry-run", "--", "train", "recipe=demo"])
    assert args.func is launcher.launch and args.dry_run and args.command == "launch"
    assert args.train_argv == ["--", "train", "recipe=demo"]
