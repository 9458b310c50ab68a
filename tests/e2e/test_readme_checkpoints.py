"""The README's "Naming a checkpoint" commands, run as written with the network off: the plan
against a hub cache holding only Llama-3.1-8B-Instruct's real config.json (no weights), then
training and scoring from the hub id against a cache where that id holds a tiny random Llama
(the 8-GPU node scaled to 2 gloo ranks and a few steps). Every other word is the README's."""

import re
import shlex
import subprocess
import sys

import pytest

from conftest import readme_bash_commands
from hub_cache import LLAMA31_8B_CONFIG, add_snapshot, offline_env, tiny_llama_folder
from multirank import free_port

HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"
TRAIN_SCALE = ["trainer.devices=2", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
               "trainer.max_steps=2", "trainer.max_epochs=null", "optim.warmup_steps=1",
               "data.max_seq_length=256", "trainer.val_check_interval=2",
               "checkpoint.save_interval=2", "logging.progress_bar=false",
               "logging.tensorboard=false"]


def readme_commands():
    return readme_bash_commands("**Naming a checkpoint.**")


def _argv(command):
    words = shlex.split(command)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    program, args = words[0], words[1:]
    if program == "nemo-aot":
        return env, [sys.executable, "-m", "nemo_aot.cli", *args]
    assert program == "torchrun" and args[0] == "--nproc_per_node=8", command
    return env, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                 f"--master_port={free_port()}", *args[1:], *TRAIN_SCALE]


@pytest.mark.slow
def test_naming_a_checkpoint_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) == 3 and all(HUB_ID in c for c in commands)
    config_only = tmp_path / "config_only"
    add_snapshot(config_only, HUB_ID, files={"config.json": LLAMA31_8B_CONFIG})
    tiny = tmp_path / "tiny"
    add_snapshot(tiny, HUB_ID, files_from=tiny_llama_folder(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    from nemo_aot.data.config import resolve_path

    with open(resolve_path("bundled:paired/train.jsonl")) as f:
        rows = f.readlines()
    (work / "prefs_train.jsonl").write_text("".join(rows[:16]))
    (work / "prefs_val.jsonl").write_text("".join(rows[16:24]))
    for command in commands:
        extra, argv = _argv(command)
        home = config_only if "--plan" in command else tiny
        env = dict(offline_env(home, tmp_path / "converted"), **extra)  # no network here
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (f"README command failed: {command}\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        if "--plan" in command:
            assert "32 layers, hidden 4096, vocab 128256" in proc.stdout
    assert (work / "llama31_8b_hub_run" / "aot_policy.nemo").is_file()
    assert len((work / "hub_scores.jsonl").read_text().splitlines()) == 8
