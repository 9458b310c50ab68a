"""Smoke test of the AOT-vs-DPO study (scripts/experiments/run_study.py --mode smoke).

The smallest pass through every stage the real study runs: SFT of a reference on nemo_aot's
megatron path, preference data from its samples, single-process and torchrun (DP=2) training
workers, evaluation through the Hugging Face export, and the report. Numbers are not asserted:
a few steps on a few dozen questions say nothing about the methods (docs/results.md does).
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, env

pytestmark = pytest.mark.slow


def test_study_smoke_writes_the_tables_and_plots(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "experiments", "run_study.py"),
           "--mode", "smoke", "--out", str(out), "--jobs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

    with open(out / "reference" / "reference.json") as f:
        sft = json.load(f)["sft_loss"]
    assert sft[-1][1] < sft[0][1]  # the SFT loop learns

    results = json.loads((out / "results.json").read_text())
    assert {r["loss_type"] for r in results["headline"]} == {"aot_unpaired", "dpo"}
    assert {r["sort_scope"] for r in results["scope"]} == {"global", "data_parallel"}
    assert all(r["heldout_accuracy"]["n"] == 1 for r in results["headline"] + results["scope"])
    table = (out / "results.md").read_text()
    assert "| loss | beta |" in table and "| sort scope |" in table
    for plot in results["plots"]:
        assert (out / plot).stat().st_size > 1000
    # the study resumes: a second invocation finds every stage done and only re-reports
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "[study] train: 0 s" in again.stdout
