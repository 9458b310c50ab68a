"""A packed run (data.pack_sequences=true) of the demo task trains the padded run's curve within
fp32 noise: the same loss, rewards, log-probs and gradient norm at every step and at validation,
and logs the packing efficiency at start-up."""

import pytest

from conftest import history, run_cli, train_args

KEYS = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
        "grad_norm")


@pytest.mark.parametrize("layout", [[], ["parallel.pipeline_model_parallel_size=2",
                                         "data.uniform_step_length=true"]], ids=["tp1", "pp2"])
def test_packed_run_follows_the_padded_run(layout, small_data, init_nemo, tmp_path):
    nproc = 2 if layout else 1
    common = [f"init_from={init_nemo}", "data.max_seq_length=96", *layout]
    run_cli(["train", *train_args(small_data, tmp_path / "padded", *common)], nproc=nproc)
    proc = run_cli(["train", *train_args(small_data, tmp_path / "packed", *common,
                                         "data.pack_sequences=true")], nproc=nproc)
    assert "real tokens per token slot" in proc.stdout + proc.stderr
    for split in ("train", "validation"):
        ref, got = history(tmp_path / "padded", split), history(tmp_path / "packed", split)
        assert [r["step"] for r in got] == [r["step"] for r in ref] and ref
        for a, b in zip(ref, got):
            for key in KEYS:
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (split, key)
