"""Smoke test of the TRL cross-check (python -m scripts.experiments.trl_crosscheck --mode smoke).

From the packaged reference: preference data, nemo_aot and TRL ``DPOTrainer`` trainings (dpo and
aot_unpaired, 4 steps each) on identical tokens and batches, the study's evaluation of both, and
the report. Held-out numbers are not asserted (4 steps say nothing about the methods); the two
trainers' per-step losses and gradient norms are, since they see the same weights and batches.
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, env

pytestmark = pytest.mark.slow
pytest.importorskip("trl")


def test_trl_crosscheck_smoke(tmp_path):
    out = tmp_path / "crosscheck"
    cmd = [sys.executable, "-m", "scripts.experiments.trl_crosscheck", "--mode", "smoke",
           "--out", str(out), "--jobs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = json.loads((out / "results.json").read_text())
    assert {(r["trainer"], r["loss_type"]) for r in results["rows"]} == {
        (t, loss) for t in ("nemo_aot", "trl") for loss in ("dpo", "aot_unpaired")}
    assert len(results["agreement"]) == 2
    for name, agreement in results["agreement"].items():
        assert agreement["steps"] == 4
        for trace in ("loss", "grad_norm", "lr"):
            assert agreement[trace]["max_rel_diff"] < 1e-4, (name, trace, agreement[trace])
    assert "| trainer |" in (out / "results.md").read_text()
