"""One step, plain and LoRA, computes the baseline release's loss and gradients (the
compatibility tier; skipped outside it - see tests/compat/records.py).

The baseline release (0.16.1) writes the initial weights as a megatron-core dist checkpoint,
and its step's loss and gradients; every other release loads those weights (a checkpoint
written by 0.16.1) and must compute the same numbers within the tolerances of
test_layout_invariance.py. Together with that test and test_lora_layouts.py, run under the same
release, every layout then matches the baseline's single process.
"""

import os
import shutil

import pytest
import torch

from compat import records
from multirank import run_multirank

pytestmark = records.ONLY_IN_THE_TIER
LOSS_TOL = dict(rtol=1e-5, atol=1e-5)  # test_layout_invariance.py
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)
LORA = {"scheme": "lora", "rank": 4, "alpha": 8.0}  # test_lora_layouts.py


def _one_step(init_dir, peft_options, write_init):
    import mcore_utils as mu
    from nemo_aot.models.options import PeftConfig

    peft = PeftConfig(**peft_options) if peft_options else None
    chunks, config = mu.setup(peft=peft)
    if write_init:
        if peft is not None:
            mu.nonzero_lora_b(chunks)
        mu.save(chunks, init_dir)
    else:
        mu.load(chunks, init_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    grads = {n: p.main_grad.detach().clone() for n, p in chunks[0].module.named_parameters()
             if p.requires_grad}
    return total, grads


@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_one_step_matches_the_baseline(kind):
    base, mine = records.baseline(), records.folder(records.version())
    init = os.path.join(base, f"init_{kind}")
    write = records.is_baseline()
    if write:
        shutil.rmtree(init, ignore_errors=True)
    peft = LORA if kind == "lora" else None
    ((total, grads),) = run_multirank(_one_step, 1, args=(init, peft, write), timeout=300)
    torch.save({"total": total, "grads": grads}, os.path.join(mine, f"step_{kind}.pt"))
    if write:
        return
    ref = torch.load(os.path.join(base, f"step_{kind}.pt"))
    assert total[1] == ref["total"][1]
    assert grads.keys() == ref["grads"].keys(), "parameter names differ from the baseline's"
    records.record(f"step_{kind}", {
        "loss_abs": (total[0] - ref["total"][0]).abs().item(),
        "grad_max_abs": max((grads[k] - ref["grads"][k]).abs().max().item() for k in grads)})
    torch.testing.assert_close(total[0], ref["total"][0], **LOSS_TOL)
    for key in grads:
        torch.testing.assert_close(grads[key], ref["grads"][key], **GRAD_TOL,
                                   msg=lambda m, k=key: f"{kind} {k}: {m}")
