"""Smoke test of the unpaired-shape study (python -m scripts.experiments.unpaired_shape --mode
smoke): from the packaged reference, preference data, the formable pairs, aot_unpaired on the
unpaired set at its own share of positives (one sort per step, and 4 answers per sort), dpo on
all formable pairs and on one pair per prompt (4 steps each), the study's evaluation and the
report. Numbers are not asserted."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, env

pytestmark = pytest.mark.slow


def test_unpaired_shape_smoke(tmp_path):
    out = tmp_path / "shape"
    cmd = [sys.executable, "-m", "scripts.experiments.unpaired_shape", "--mode", "smoke",
           "--out", str(out), "--jobs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = json.loads((out / "results.json").read_text())
    assert {r["label"] for r in results["rows"]} == {
        "aot_unpaired-natural", "aot_unpaired-natural-sort4", "dpo-allpairs", "dpo-onepair"}
    shape = results["shape"]
    # every negative of a prompt with a positive enters exactly one pair
    assert shape["pairs"] == shape["negatives_in_pairs"] >= shape["one_pair_per_prompt"]
    assert shape["one_pair_per_prompt"] == shape["prompts_with_both"]
    pairs = [json.loads(line) for line in open(out / "data" / "train_allpairs.jsonl")]
    assert len(pairs) == shape["pairs"]
    config = (out / "runs" / "aot_unpaired-natural-b2-s0" / "config.yaml").read_text()
    assert "unpaired_positive_fraction: null" in config
    assert "| cell | beta |" in (out / "results.md").read_text()
