"""A tokenizer that disagrees with the model: every command that takes one (``train``'s
data.tokenizer_path, ``score``'s --tokenizer) runs the same check
(``data.tokenization.check_tokenizer_fits``) over a table of tokenizers: the same, the same
vocabulary in another folder, permuted ids of the same size, larger, far smaller. (``demo``,
``export``, ``convert``, ``--plan`` and the launcher take no tokenizer of their own: demo and
the launcher go through train's resolution, export uses the checkpoint's copy.)"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from nemo_aot.algorithms.config import AOTConfig
from nemo_aot.algorithms.resolve import World, resolve_config
from nemo_aot.algorithms.run import policy_tokenizer
from nemo_aot.data.config import DataConfig, resolve_path

BUNDLED = resolve_path("bundled:tokenizer")
NEMO = "bundled:tiny_sft.nemo"  # 295 tokens stored, 512 embedding rows
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _copy(root, name):
    path = os.path.join(str(root), name)
    shutil.copytree(BUNDLED, path)
    return path


def _permuted(root):
    """Same size, two token ids swapped: every id still exists, some mean another token."""
    path = _copy(root, "permuted")
    with open(os.path.join(path, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return path


def _larger(root, extra=300):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    tok.add_tokens([f"<extra_{i}>" for i in range(extra)])  # 595 tokens > 512 rows
    path = os.path.join(str(root), "larger")
    tok.save_pretrained(path)
    return path


# name -> (make folder, refusal message or None)
TOKENIZERS = {
    "same folder": (lambda root: BUNDLED, None),
    "same vocabulary, other folder": (lambda root: _copy(root, "copy"), None),
    "permuted, same size": (_permuted, "different vocabulary (295 tokens)"),
    "larger": (_larger, "different vocabulary (595 tokens)"),
}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_train_checks_the_tokenizer(name, tmp_path):
    make, refusal = TOKENIZERS[name]
    folder = make(tmp_path)
    run = resolve_config(AOTConfig(init_from=NEMO, data=DataConfig(tokenizer_path=folder)),
                         world=World(1))
    if refusal is None:
        policy_tokenizer(run, str(tmp_path / "scratch"))
        return
    with pytest.raises(ValueError) as err:
        policy_tokenizer(run, str(tmp_path / "scratch"))
    assert f"data.tokenizer_path={folder} has a {refusal}" in str(err.value)
    assert "data.tokenizer_path=null" in str(err.value)


def _score(tmp_path, tokenizer):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "scores.jsonl"
    cmd = [sys.executable, "-m", "nemo_aot.cli", "score", "--model", resolve_path(NEMO),
           "--data", resolve_path("bundled:paired/validation.jsonl"), "--out", str(out),
           "--tokenizer", tokenizer]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["permuted, same size", "larger"])
def test_score_runs_the_same_check(name, tmp_path):
    make, refusal = TOKENIZERS[name]
    folder = make(tmp_path)
    proc = _score(tmp_path, folder)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"nemo-aot score: error: --tokenizer {folder} has a {refusal}" in proc.stderr
    assert "drop --tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "scores.jsonl").exists()
