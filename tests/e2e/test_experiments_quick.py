"""Smoke test of the AOT-vs-DPO study (python -m scripts.experiments.run_study --mode smoke).

The smallest pass through every stage the real study runs: SFT on nemo_aot's megatron path
(a few steps of ``sft_reference``), then, from the packaged reference policy, preference data
from its samples, single-process and torchrun (DP=2) training workers, evaluation through the
Hugging Face export, and the report. Numbers are not asserted: a few steps on a few dozen
questions say nothing about the methods (docs/results.md does).
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, env

pytestmark = pytest.mark.slow


STUDY = "scripts.experiments"  # a package, run from the repository root as the README says


def test_sft_reference_learns(tmp_path):
    out = tmp_path / "reference"
    cmd = [sys.executable, "-m", f"{STUDY}.sft_reference", "--out", str(out),
           "--steps", "30", "--check-every", "30", "--sft-questions", "256",
           "--dev-questions", "16", "--batch-size", "16", "--target-low", "0.0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    with open(out / "reference.json") as f:
        record = json.load(f)
    assert record["step"] == 30 and [c["step"] for c in record["dev_curve"]] == [30]
    losses = [loss for _, loss in record["sft_loss"]]
    assert len(losses) == 30 and losses[-1] < losses[0]  # the SFT loop learns
    assert (out / "reference.nemo").stat().st_size > 100_000


def test_study_smoke_writes_the_tables_and_plots(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", f"{STUDY}.run_study", "--mode", "smoke", "--out",
           str(out), "--jobs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"

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
