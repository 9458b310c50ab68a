"""Smoke run of the AOT step benchmark (benchmarks/aot_step/, started as documented through
scripts/bench_aot_step.py) on the tiny preset, on the CPU.

Speed numbers are not asserted (performance is read from the benchmark's ratios, never from
timed assertions). What is asserted: the run completes, the JSON has its documented keys with
positive throughput, optional variants are skipped with a reason rather than failing, and every
variant computes the same training trajectory (same weights, tokens and loss), which is what
makes the ratios a like-for-like comparison.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "scripts", "bench_aot_step.py")


def test_entry_script_and_module_are_one_program(tmp_path):
    """The documented script runs from any folder and is ``python -m benchmarks.aot_step``."""
    script = subprocess.run([sys.executable, BENCH, "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    module = subprocess.run([sys.executable, "-m", "benchmarks.aot_step", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and module.returncode == 0, script.stderr + module.stderr
    options = lambda text: text[text.index("options:"):]  # noqa: E731  (usage names the program)
    assert "--shape" in script.stdout and options(script.stdout) == options(module.stdout)


def test_bench_tiny_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-W", "ignore", BENCH, "--shape", "tiny", "--layers", "2",
           "--pairs", "2", "--seq", "16", "--warmup", "1", "--steps", "2",
           "--variants", "nemo_aot_cached,nemo_aot_ref,hf,hf_liger", "--out", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    for key in ("benchmark", "device", "note", "config", "versions", "command",
                "tokens_per_step", "flops", "variants", "ratios", "loss_check"):
        assert key in result, key
    assert result["device"]["type"] == "cpu" and result["device"]["gpu_run"] is False
    assert result["tokens_per_step"] == 2 * 2 * 16
    assert "6N" in result["flops"]["formula"]
    flops = result["flops"]
    assert flops["trained_flops_per_token"] > flops["reference_flops_per_token"] > 0

    variants = result["variants"]
    for name in ("nemo_aot_cached", "nemo_aot_ref", "hf"):
        v = variants[name]
        assert v["status"] == "ok", v
        assert v["tokens_per_s"] > 0 and v["median_step_s"] > 0
        assert len(v["step_times_s"]) == 2 and len(v["losses"]) == 3
        assert v["mfu"] is None  # no peak FLOP/s is defined for a CPU
        assert v["peak_memory_gib"] is not None
    assert variants["nemo_aot_cached"]["reference_forward"] is False
    assert variants["nemo_aot_ref"]["reference_forward"] is True
    liger = variants["hf_liger"]
    assert liger["status"] in ("ok", "skipped")
    if liger["status"] == "skipped":
        assert "liger" in liger["reason"]

    for pair in ("nemo_aot_cached/hf", "nemo_aot_ref/hf"):
        assert result["ratios"][pair]["tokens_per_s"] > 0
    # Same initial weights, tokens, loss and optimizer: the loss traces agree in fp32.
    diffs = result["loss_check"]["max_abs_diff"]
    assert result["loss_check"]["against"] == "hf"
    assert max(result["loss_check"]["after_first_update"].values()) < 1e-4
    assert max(diffs.values()) < 1e-4, diffs


def test_packing_bench_smoke(tmp_path):
    """python -m benchmarks.packing (README's command, scaled down): runs, both variants train
    the same trajectory, and packing fills more of the token slots."""
    out = tmp_path / "packing.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.packing", "--steps", "1",
           "--pairs", "4", "--seq", "1024", "--out", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_loss_difference"] < 1e-4
    share = result["real_tokens_per_slot"]
    assert share["packed"] > share["padded"]
    assert result["slots_per_step"]["packed"] < result["slots_per_step"]["padded"]
    assert all(v > 0 for v in result["real_tokens_per_s"].values())
