"""Shared helpers for end-to-end CLI runs (subprocesses, small data, metrics files)."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The first 16 training pairs of the bundled demo data, validated on themselves: the e2e
    runs check that optimization works (a random-init model cannot learn arithmetic in a few
    steps; held-out improvement is the demo's and the experiments' job)."""
    from nemo_aot.data.tokenization import resolve_path

    out = tmp_path_factory.mktemp("data")
    src = resolve_path("bundled:paired/train.jsonl")
    with open(src) as f:
        lines = [line for _, line in zip(range(16), f)]
    for split in ("train", "validation"):
        (out / f"{split}.jsonl").write_text("".join(lines))
    return out


@pytest.fixture(scope="session")
def init_nemo(tmp_path_factory):
    """A tiny random Llama built with transformers, converted to .nemo by the CLI: the policy
    every e2e run starts from (random init itself is not layout-invariant under PP)."""
    return make_init_nemo(tmp_path_factory.mktemp("init"))


def make_init_nemo(root, vocab_size=512):
    """``vocab_size`` 300 pads to 384 rows at TP1 but 512 at TP2 (128 x TP)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    return convert_to_nemo(LlamaForCausalLM(config), root)


def convert_to_nemo(model, root):
    """``model`` (transformers) saved with the bundled tokenizer into ``root/hf`` and converted
    by the CLI to ``root/init.nemo`` (fp32); returns that path."""
    import shutil

    from nemo_aot.data.tokenization import resolve_path

    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    tok = resolve_path("bundled:tokenizer")
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), hf_dir / name)
    out = root / "init.nemo"
    run_cli(["convert", "hf-to-nemo", "--hf", str(hf_dir), "--out", str(out), "--dtype", "fp32"])
    return out


def train_args(data_dir, output_dir, *extra):
    return ["recipe=demo", "trainer.max_steps=8", "trainer.max_epochs=null",
            "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            "trainer.val_check_interval=4",
            "checkpoint.save_interval=4",
            f"data.train_path={data_dir}/train.jsonl",
            f"data.validation_path={data_dir}/validation.jsonl",
            "data.tokenizer_path=bundled:tokenizer", "optim.lr=5e-3", "optim.warmup_steps=1",
            "model.num_layers=2", "logging.progress_bar=false", "logging.tensorboard=false",
            f"logging.output_dir={output_dir}", *extra]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    e.pop("WORLD_SIZE", None)
    return e


def run_cli(args, nproc=1, timeout=420, check=True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "nemo_aot.cli", *args]
    else:
        from multirank import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "nemo_aot.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def history(output_dir, split="train"):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["split"] == split]


CURVE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "fsd_violation", "grad_norm")


def curve(records, keys=CURVE_KEYS):
    return [(r["step"], *(r.get(k) for k in keys)) for r in records]


def start_cli(args, nproc=1):
    """``nemo-aot ARGS`` in the background (stdout and stderr merged), e.g. to kill it; with
    ``nproc`` > 1 under torchrun, in a session of its own (see ``kill_job``)."""
    cmd = [sys.executable, "-m", "nemo_aot.cli", *args]
    if nproc > 1:
        from multirank import free_port

        cmd[1:2] = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={free_port()}", "-m"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=nproc > 1)


def kill_job(proc, timeout=60):
    """SIGKILL a run started by ``start_cli`` and every process under it at once, as a cluster
    preemption ends a job. torchrun starts each rank in a session of its own, so the launcher's
    process group alone would leave the ranks training; every process group of the launcher's
    tree is killed. Fails if any process of those groups is still alive (not a zombie) after
    ``timeout`` seconds: nothing of the run may outlive it."""
    import signal

    import psutil

    assert os.getpgid(proc.pid) == proc.pid, "kill_job needs a run started in its own session"
    root = psutil.Process(proc.pid)
    groups = set()
    for p in (root, *root.children(recursive=True)):
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for group in sorted(groups, key=lambda g: g == proc.pid):  # the ranks', then the launcher's
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=timeout)

    def alive():
        found = []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive()
    assert not left, f"processes of the killed run still alive: {left}"
    return sorted(groups)


def wait_for(predicate, proc, timeout=300):
    """Poll ``predicate`` until true; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n"
                                 f"{proc.stdout.read()[-4000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def readme_bash_commands(heading):
    """The commands of the first ```bash block after ``heading`` in README.md, as a user
    types them (continuation lines joined, comments and blank lines dropped)."""
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]
