"""The README's quick start, run as written in a fresh folder, with a tiny model substituted:
the Hugging Face checkpoint is a tiny random Llama (with the bundled tokenizer), the 8-GPU node
is 4 gloo ranks (the recipe's batch and sequence sizes scaled as the recipe tier scales them),
and the data files are the bundled arithmetic pairs. Every other word is the README's."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, env
from multirank import free_port

SCALE = {"--nproc_per_node=8": "--nproc_per_node=4", "--step 400": "--step 54"}
# 8 pairs per step (micro 2 x DP 2 x 2 accumulation), 54 steps: the recipe's warmup (50) + 4.
TRAIN_SCALE = ["trainer.devices=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=8",
               "data.max_seq_length=256"]
PAIRS = 8 * 54


def quickstart_commands():
    """The shell commands of the README's quick start block, continuation lines joined."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _tiny_hf(path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_aot.data.tokenization import resolve_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False)).save_pretrained(path)
    tokenizer = resolve_path("bundled:tokenizer")
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), os.path.join(path, name))


def _prefs(cwd):
    from nemo_aot.data.tokenization import resolve_path

    with open(resolve_path("bundled:paired/train.jsonl")) as f:
        rows = f.readlines()
    (cwd / "prefs_train.jsonl").write_text("".join(rows[:PAIRS]))
    (cwd / "prefs_val.jsonl").write_text("".join(rows[PAIRS:PAIRS + 32]))


def _argv(command, hf_dir):
    for text, scaled in SCALE.items():
        command = command.replace(text, scaled)
    words = shlex.split(command.replace("/models/Llama-3.1-8B-Instruct", str(hf_dir)))
    program, args = words[0], words[1:]
    if program.endswith("nemo-aot"):
        return [sys.executable, "-m", "nemo_aot.cli", *args]
    assert program == "torchrun", command
    nproc = [a for a in args if a.startswith("--nproc_per_node")]
    rest = [a for a in args if not a.startswith("--nproc_per_node")]
    assert rest[:2] == ["-m", "nemo_aot.cli"] and "train" in rest, command
    return [sys.executable, "-m", "torch.distributed.run", *nproc, f"--master_port={free_port()}",
            *rest, *TRAIN_SCALE]


# Multi-minute (every quick-start command, a 4-rank run among them): make test-slow.
@pytest.mark.slow
def test_quick_start_as_written(tmp_path):
    commands = quickstart_commands()
    assert any(c.startswith("torchrun") for c in commands) and len(commands) >= 5
    hf_dir = tmp_path / "hf_llama"
    _tiny_hf(hf_dir)
    work = tmp_path / "work"
    work.mkdir()
    _prefs(work)
    for command in commands:
        argv = _argv(command, hf_dir)
        proc = subprocess.run(argv, cwd=work, env=env(), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, (f"README command failed: {command}\n"
                                      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    # What the commands promise exists.
    for produced in ("demo_output/aot_policy.nemo", "llama31_8b.nemo",
                     "llama31_8b_run/aot_policy.nemo", "llama31_8b_aot/config.json",
                     "llama31_8b_aot_400.nemo", "scores.jsonl"):
        assert (work / produced).exists(), produced
    with open(work / "scores.jsonl") as f:
        assert len([json.loads(line) for line in f]) == 32
