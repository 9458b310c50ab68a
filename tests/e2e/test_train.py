"""`nemo-aot train` end to end on the tiny model: it learns, it is deterministic, and every
parallel layout follows the single-process loss curve."""

import math

import pytest

from conftest import curve, history, run_cli, train_args

TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")


@pytest.fixture(scope="module")
def single(small_data, init_nemo, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_cli(["train", *train_args(small_data, out, f"init_from={init_nemo}")])
    return out


def test_training_lowers_the_loss(single):
    train = history(single)
    assert [r["step"] for r in train] == list(range(1, 9))
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert train[0]["rewards/chosen"] == 0.0 and train[0]["rewards/rejected"] == 0.0
    # Hugging Face TRL's DPOTrainer names, so its dashboards read these runs
    for split in ("train", "validation"):
        assert set(TRL_NAMES) <= set(history(single, split)[-1]), split
    assert train[0]["logps/chosen"] < 0 and train[0]["logits/chosen"] is not None
    assert sum(r["loss"] for r in train[-2:]) / 2 < train[0]["loss"] - 0.01
    val = history(single, "validation")
    assert [r["step"] for r in val] == [0, 4, 8]
    assert val[-1]["loss"] < val[0]["loss"] - 0.01
    assert val[-1]["rewards/margins"] > 0
    assert val[-1]["fsd_violation"] < val[1]["fsd_violation"] or val[-1]["fsd_violation"] == 0
    assert (single / "aot_policy.nemo").exists()
    assert (single / "plots" / "reward_cdf.png").stat().st_size > 1000


def test_same_seed_same_curve(single, small_data, init_nemo, tmp_path):
    run_cli(["train", *train_args(small_data, tmp_path, f"init_from={init_nemo}")])
    assert curve(history(tmp_path)) == curve(history(single))


@pytest.mark.parametrize("layout", [
    ["parallel.tensor_model_parallel_size=2"],
    ["parallel.pipeline_model_parallel_size=2", "data.uniform_step_length=true"],
    # Two processes, data parallel. The data_parallel sort scope would sort over both ranks'
    # micro-batches (a different objective from one process); micro is layout-invariant.
    ["alignment.sort_scope=micro"],
    ["alignment.sort_scope=micro", "optim.use_distributed_optimizer=true"],
])
def test_parallel_layouts_follow_the_single_process_curve(layout, single, small_data, init_nemo,
                                                         tmp_path):
    run_cli(["train", *train_args(small_data, tmp_path, f"init_from={init_nemo}", *layout)],
            nproc=2)
    ref, got = history(single), history(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen",
                    "logits/rejected", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-4), (a["step"], key)


def test_cpu_swap_reference_equals_cached(single, small_data, init_nemo, tmp_path):
    """Both reference policies run the policy's own forward: identical rewards at every step
    (and exactly zero before the first update)."""
    run_cli(["train", *train_args(small_data, tmp_path, f"init_from={init_nemo}",
                                  "alignment.reference_policy=cpu_swap")])
    assert curve(history(tmp_path)) == curve(history(single))
    assert curve(history(tmp_path, "validation")) == curve(history(single, "validation"))


def test_global_scope_validates_unpaired_data_to_the_end(tmp_path):
    """The unpaired validation sampler ends with negatives-only batches once the positives run
    out; the global scope used to fail on them ("holds no chosen or no rejected samples")."""
    run_cli(["demo", "--output-dir", str(tmp_path), "data=bundled_unpaired",
             "alignment.sort_scope=global", "trainer.max_steps=2", "trainer.val_check_interval=2",
             "optim.warmup_steps=1", "trainer.limit_val_batches=null"])
    val = history(tmp_path, "validation")
    assert [r["step"] for r in val] == [0, 2]
    assert val[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
