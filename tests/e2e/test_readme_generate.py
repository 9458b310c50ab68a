"""The README's "Generating text" command, run as written in a fresh folder: the .nemo is the
tiny random Llama of the e2e runs (converted by the CLI, bundled tokenizer), the prompts file
holds one plain and one conversational prompt. Every other word is the README's."""

import json
import shlex
import shutil
import subprocess
import sys

from conftest import env, readme_bash_commands


def readme_commands():
    return readme_bash_commands("**Generating text.**")


def test_generating_text_as_written(init_nemo, tmp_path):
    commands = readme_commands()
    assert len(commands) == 1 and commands[0].startswith("nemo-aot generate")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(init_nemo, work / "llama31_8b.nemo")
    prompts = [{"prompt": "What is 2 + 2?"},
               {"prompt": [{"role": "user", "content": "Compute 77 + 31."}]}]
    (work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    words = shlex.split(commands[0])
    proc = subprocess.run([sys.executable, "-m", "nemo_aot.cli", *words[1:]], cwd=work,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{commands[0]}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in (work / "completions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    max_new = int(words[words.index("--max-new-tokens") + 1])
    for row in rows:
        assert 0 < len(row["completion_ids"]) <= max_new and isinstance(row["completion"], str)
        assert row["finish_reason"] in ("eos", "max_new_tokens")
