"""``init_from`` as a hub id or a Hugging Face folder, end to end with the network off: a tiny
random Llama in a hub cache built on local disk (``HF_HUB_OFFLINE=1``) trains exactly as the
.nemo converted from the same weights does (its tokenizer named by the hub id too), the
converted copy is made once (one process of several converts, the others wait) and reused, and
``score`` / ``convert`` take the id too."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, history, train_args
from hub_cache import add_snapshot, offline_env, tiny_llama_folder
from multirank import free_port

REPO = "tinyorg/tiny-llama"
COMMIT = "c0ffee" + "0" * 34
pytestmark = pytest.mark.xdist_group("hub_ids")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(environment, hf folder, root): the tiny Llama of ``init_nemo`` as hub snapshot REPO."""
    root = tmp_path_factory.mktemp("hub")
    folder = tiny_llama_folder(root)
    add_snapshot(root / "hf_home", REPO, files_from=folder, commit=COMMIT)
    return offline_env(root / "hf_home", root / "converted"), folder, root


def _cli(args, environment, check=True):
    proc = subprocess.run([sys.executable, "-m", "nemo_aot.cli", *args], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(hub, init_nemo, small_data, tmp_path_factory):
    """The same 3-step run from the .nemo, the hub id and the Hugging Face folder."""
    environment, folder, _ = hub
    out = {}
    for name, init in (("nemo", str(init_nemo)), ("hub", REPO), ("folder", folder)):
        output = tmp_path_factory.mktemp(f"run_{name}")
        # the hub run also names its tokenizer by the hub id
        tokenizer = [f"data.tokenizer_path={REPO}"] if name == "hub" else []
        _cli(["train", *train_args(small_data, output, f"init_from={init}", "trainer.max_steps=3",
                                   "trainer.val_check_interval=3", "checkpoint.save_interval=3",
                                   *tokenizer)],
             environment)
        out[name] = output
    return out


def _metrics(output, split):
    """Every logged value but the clock's."""
    clock = ("time", "step_time", "tokens_per_s", "mfu")
    return [{k: v for k, v in r.items() if k not in clock} for r in history(output, split)]


def _weights(nemo_path, tmp):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from nemo_aot.models.nemo_format import extract_nemo, weights_dir

    folder = extract_nemo(str(nemo_path), str(tmp / "extracted"))
    dcp_to_torch_save(weights_dir(folder), str(tmp / "weights.pt"))
    state = torch.load(tmp / "weights.pt", weights_only=True)
    return {k: v for k, v in state.items() if "_extra_state" not in k}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hub", "folder"])
def test_training_from_a_hub_id_or_folder_equals_training_from_the_nemo(runs, hub, name,
                                                                        tmp_path):
    for split in ("train", "validation"):
        assert _metrics(runs[name], split) == _metrics(runs["nemo"], split)
        assert len(_metrics(runs[name], split)) >= 2
    mine = _weights(runs[name] / "aot_policy.nemo", tmp_path / name)
    theirs = _weights(runs["nemo"] / "aot_policy.nemo", tmp_path / "nemo")
    assert mine.keys() == theirs.keys() and len(mine) > 5
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    with open(runs[name] / "config.yaml") as f:  # init_from as the user named it
        assert f"init_from: {REPO if name == 'hub' else hub[1]}\n" in f.read()


@pytest.mark.slow
def test_the_hub_id_was_converted_once_into_the_cache_keyed_by_repo_and_commit(runs, hub):
    _, _, root = hub
    converted = root / "converted" / "converted" / "models--tinyorg--tiny-llama"
    assert sorted(os.listdir(converted)) == [f"{COMMIT}-fp32.nemo", f"{COMMIT}-fp32.nemo.lock"]


@pytest.mark.slow
def test_one_process_converts_while_the_others_wait(hub, tmp_path):
    """Two ranks of a launch resolve the same hub id at once: one converts, the other waits
    and reuses the file; a later resolution reuses it without converting."""
    environment, _, _ = hub
    # torchrun's variables: a conversion child that kept them would join this store and hang
    environment = dict(environment, NEMO_AOT_CACHE=str(tmp_path / "cache"), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                       TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RUN_ID="none")
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO); "
            "from nemo_aot.conversion.sources import checkpoint_source, local_nemo; "
            f"print(local_nemo(checkpoint_source({REPO!r})))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, text=True,
                              env=dict(environment, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1 and os.path.isfile(paths.pop())
    assert sum(err.count("converting tinyorg/tiny-llama") for _, err in results) == 1
    again = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0 and "converting" not in again.stderr


@pytest.mark.slow
def test_score_and_convert_take_a_hub_id(hub, init_nemo, small_data, tmp_path):
    environment, _, _ = hub
    environment = dict(environment, NEMO_AOT_CACHE=str(tmp_path / "cache"))
    scores = {}
    for name, model in (("hub", f"{REPO}@{COMMIT}"), ("nemo", str(init_nemo))):
        out = tmp_path / f"{name}.jsonl"
        tokenizer = ["--tokenizer", REPO] if name == "hub" else []
        _cli(["score", "--model", model, "--data", f"{small_data}/train.jsonl", "--out",
              str(out), *tokenizer], environment)
        scores[name] = [json.loads(line) for line in out.read_text().splitlines()]
    assert scores["hub"] == scores["nemo"] and len(scores["hub"]) == 16
    _cli(["convert", "hf-to-nemo", "--hf", REPO, "--out", str(tmp_path / "c.nemo")], environment)
    assert (tmp_path / "c.nemo").is_file()
    missing = _cli(["convert", "hf-to-nemo", "--hf", f"{REPO}@v9", "--out",
                    str(tmp_path / "d.nemo")], environment, check=False)
    assert missing.returncode == 2 and f"hf download {REPO} --revision v9" in missing.stderr
