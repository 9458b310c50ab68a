"""Every `nemo-aot demo ...` command in the README's code blocks, run as written in a fresh
folder (the demo is already the tiny CPU size). The quick start's demo runs in
test_readme_quickstart.py; a demo command added to any other section is picked up here.
Each run must finish, write its policy and metrics, and show what its section promises."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, env


def readme_demo_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    quick_start = text.index("## Quick start")
    quick_end = text.index("\n## ", quick_start + 1)
    commands = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        if quick_start <= block.start() < quick_end:
            continue
        for line in block.group(1).replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("nemo-aot demo"):
                commands.append(line)
    return commands


COMMANDS = readme_demo_commands()


def test_the_readme_has_the_feature_demos():
    """LoRA and the SFT term are documented with a demo command (the bar for both features)."""
    assert any("peft=lora" in c for c in COMMANDS), COMMANDS
    assert any("alignment.sft_loss_weight=" in c for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_demo_runs_as_written(command, tmp_path):
    argv = shlex.split(command)[1:]
    proc = subprocess.run([sys.executable, "-m", "nemo_aot.cli", *argv], cwd=tmp_path,
                          env=dict(env(), PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "nemo-aot demo: done after 60 steps" in proc.stdout, proc.stdout[-3000:]
    out = tmp_path / "demo_output"
    assert (out / "aot_policy.nemo").is_file()
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 60
    if "peft=lora" in argv:
        assert (out / "aot_adapter" / "adapter_config.json").is_file()
        assert (out / "aot_adapter" / "adapter_model.safetensors").is_file()
        assert "LoRA adapter" in proc.stdout
        assert train[0]["rewards/chosen"] == 0.0  # adapters_off: B = 0 at the start
    if any(a.startswith("alignment.sft_loss_weight=") for a in argv):
        assert all(r["nll_loss"] > 0 for r in train)
        first, last = (sum(r["nll_loss"] for r in part) / 10 for part in (train[:10],
                                                                          train[-10:]))
        assert last < first  # the chosen responses become likelier
