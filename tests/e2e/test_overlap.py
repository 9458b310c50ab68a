"""Communication overlap changes when gradients are reduced and parameters gathered, never what
is computed: at DP2, DP2 x TP2 and DP2 under LoRA the overlapped run follows the plain run's
curve and writes the same weights, bit for bit.

The runs checkpoint after a step with no validation: no forward has run since the optimizer
step, so with the parameter all-gather deferred to the next forward (overlap_param_gather) only
the model's explicit sync makes the checkpoint hold the updated weights; the cpu_swap reference
(parked and restored around each reference forward) needs it too. Gradient clipping is off so
that the bucket layout (one bucket without overlap, many with a small bucket size) cannot change
the update through the summation order of the clipping norm.
"""

import pytest
import torch

from conftest import history, run_cli, train_args

PLAIN = ["alignment.sort_scope=micro", "optim.use_distributed_optimizer=true",
         "trainer.grad_clip=0", "trainer.max_steps=5", "trainer.val_check_interval=3",
         "checkpoint.save_interval=4"]
OVERLAP = ["performance.overlap_grad_reduce=true", "performance.overlap_param_gather=true"]
LAYOUTS = {
    # one bucket (megatron's default size): the deferred gather of the whole model
    "dp2": (2, [], ["alignment.reference_policy=cpu_swap"]),
    # many buckets: each bucket's gather starts the next one's (megatron's prefetch chain)
    "dp2xtp2": (4, ["parallel.tensor_model_parallel_size=2"], ["performance.ddp_bucket_size=4000"]),
    # LoRA: the frozen base is outside DDP's buckets (no hooks, never gathered), the adapters in
    "dp2_lora": (2, ["peft=lora", "alignment.reference_policy=adapters_off"],
                 ["performance.ddp_bucket_size=2000"]),
}


def _run(small_data, init_nemo, out, nproc, *extra):
    run_cli(["train", *train_args(small_data, out, f"init_from={init_nemo}", *PLAIN, *extra)],
            nproc=nproc)
    return out


def _weights(out, step):
    """The model tensors of a checkpoint, read back as full tensors in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = out / f"weights_{step}.pt"
    dcp_to_torch_save(str(out / "checkpoints" / f"step_{step:08d}"), str(path))
    state = torch.load(path, weights_only=False)
    return {k: v for k, v in state.items()
            if torch.is_tensor(v) and not k.startswith("optimizer") and "_extra_state" not in k}


# The 4-rank layout takes minutes on 2 cores: make test-slow.
@pytest.mark.parametrize("layout", [pytest.param(k, marks=pytest.mark.slow) if LAYOUTS[k][0] > 2
                                    else k for k in LAYOUTS])
def test_overlap_follows_the_plain_run(layout, small_data, init_nemo, tmp_path):
    nproc, parallel, variant = LAYOUTS[layout]
    plain = _run(small_data, init_nemo, tmp_path / "plain", nproc, *parallel)
    overlapped = _run(small_data, init_nemo, tmp_path / "overlap", nproc, *parallel, *OVERLAP,
                      *variant)
    for split in ("train", "validation"):
        ref, got = history(plain, split), history(overlapped, split)
        assert [r["step"] for r in got] == [r["step"] for r in ref] and ref
        for a, b in zip(ref, got):
            for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
                assert b[key] == a[key], (split, a["step"], key)
            if split == "train":  # the norm is summed bucket by bucket: equal up to rounding
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for step in (4, 5):  # step 4: saved after a step without validation (see the docstring)
        ref, got = _weights(plain, step), _weights(overlapped, step)
        assert ref.keys() == got.keys() and ref
        for key in ref:
            assert torch.equal(got[key], ref[key]), (step, key)
