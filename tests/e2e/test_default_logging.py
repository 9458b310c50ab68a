"""At the default log level a real CLI run shows nemo_aot's data summary on stderr, once per
job (rank 0), and no INFO noise from megatron. ``nemo-aot score`` with the bundled tiny policy
is the cheapest real path that loads data (about 10 s per run on CPU)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, env

SUMMARY = ("INFO nemo_aot.data.dataset: loaded train split: bundled:paired/validation.jsonl "
           "(trl_paired): 128 records read, 128 kept, 0 dropped")
MEGATRON_INFO = "INFO megatron"


def _score(tmp_path, nproc):
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                      f"--master_port={_free_port()}"]
    cmd = [sys.executable, *launcher, "-m", "nemo_aot.cli", "score",
           "--model", os.path.join(ROOT, "nemo_aot", "data", "bundled", "tiny_sft.nemo"),
           "--data", "bundled:paired/validation.jsonl", "--out", str(tmp_path / "scores.jsonl")]
    e = env()
    for key in ("NEMO_AOT_LOG_LEVEL", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return proc.stderr


def _free_port():
    from multirank import free_port

    return free_port()


@pytest.mark.parametrize("nproc", [1, 2])
def test_data_summary_shows_at_the_default_level_on_rank_zero_only(tmp_path, nproc):
    stderr = _score(tmp_path, nproc)
    assert stderr.count(SUMMARY) == 1, stderr[-4000:]
    assert MEGATRON_INFO not in stderr, stderr[-4000:]
