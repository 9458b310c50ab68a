"""LoRA at any parallel layout computes the single-process loss and adapter gradients, and only
the adapters train: the base stays bit-identical, and DDP's buffers and the distributed
optimizer's state hold the adapters alone.

As in test_layout_invariance.py, the reference saves its initial weights (base and adapters)
as a megatron-core dist checkpoint that every layout loads, and every layout saves its reduced
gradients the same way; both are read back whole by a TP=1 LoRA model, so the comparison relies
on the adapters' sharding metadata (B split with the column-parallel weights, fc1's B through
megatron's gate/up factory; A split with the row-parallel weights) - a wrong split or a wrong
reduction shows up as a wrong gradient.
"""

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank
from nemo_aot.models.options import PeftConfig

PEFT = PeftConfig(scheme="lora", rank=4, alpha=8.0)


def _reference(ckpt_dir):
    """One process: its gradients are whole already."""
    chunks, config = mu.setup(peft=PEFT)
    mu.nonzero_lora_b(chunks)
    mu.save(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    module = chunks[0].module
    grads = {n: p.main_grad.detach().clone() for n, p in module.named_parameters()
             if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    return total, grads, frozen


def _layout(tp, pp, sp, ckpt_dir, grad_dir):
    """One step at the layout; its reduced gradients saved, then read back whole at TP=PP=1 in
    the same processes."""
    chunks, config = mu.setup(tp, pp, None, sp, peft=PEFT)
    mu.load(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    whole, _ = mu.setup(peft=PEFT)
    mu.load(whole, grad_dir)
    state = dict(whole[0].module.named_parameters()) if torch.distributed.get_rank() == 0 else None
    return total, None if state is None else {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("lora_ref") / "init")
    (result,) = run_multirank(_reference, 1, args=(ckpt,), timeout=240)
    return (ckpt, *result)


LAYOUTS = {"tp2": (2, 1, False), "tp2_sp": (2, 1, True), "pp2": (1, 2, False),
           "dp2": (1, 1, False)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_layout_matches_single_process(name, reference, tmp_path):
    ckpt, ref_total, ref_grads, frozen = reference
    tp, pp, sp = LAYOUTS[name]
    results = run_multirank(_layout, 2, args=(tp, pp, sp, ckpt, str(tmp_path / "grads")),
                            timeout=300)
    summed = torch.stack([t for t, _ in results if t is not None]).sum(0) / tp
    assert summed[1] == ref_total[1]
    torch.testing.assert_close(summed[0], ref_total[0], rtol=1e-5, atol=1e-5)
    got = results[0][1]
    # 2 layers x 4 targets x (A, B): every adapter is compared, and only adapters train.
    assert len(ref_grads) == mu.TINY.num_layers * 4 * 2
    assert all(".adapter." in key for key in ref_grads)
    for key, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{key}: zero reference gradient"
        torch.testing.assert_close(got[key], ref, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=key: f"{name} {k}: {m}")
    for key, value in frozen.items():  # frozen weights: no gradient, saved unchanged
        assert torch.equal(got[key], value), key


def _train_with_distributed_optimizer():
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    chunks, config = mu.setup(peft=PEFT, use_distributed_optimizer=True)
    module = chunks[0].module
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                        params_dtype=torch.float32), chunks)
    for step in range(2):
        optimizer.zero_grad()
        mu.train_step(chunks, config, mu.global_batch(seed=step), num_microbatches=2)
        assert optimizer.step()[0]
    after = dict(module.named_parameters())
    state = sum(v.numel() for s in optimizer.optimizer.state.values() for k, v in s.items()
                if k in ("exp_avg", "exp_avg_sq"))
    return {"base_unchanged": all(torch.equal(after[n], v) for n, v in frozen.items()),
            "adapters_changed": all(not torch.equal(after[n], v) for n, v in trained.items()),
            "trained": sorted(trained), "trained_numel": sum(v.numel() for v in trained.values()),
            "buffer_numel": sum(p.numel() for b in chunks[0].buffers for p in b.params),
            "moments_numel": state, "frozen_numel": sum(v.numel() for v in frozen.values())}


def test_only_adapters_train_under_ddp_and_the_distributed_optimizer():
    ranks = run_multirank(_train_with_distributed_optimizer, 2, timeout=300)
    for r in ranks:
        assert r["base_unchanged"] and r["adapters_changed"], r
        assert all(".adapter." in n for n in r["trained"])
        assert r["buffer_numel"] == r["trained_numel"]  # DDP buckets: adapters only
        assert r["frozen_numel"] > 10 * r["trained_numel"]
    # The two DP ranks' shards of Adam's moments together cover the adapters once.
    assert sum(r["moments_numel"] for r in ranks) == 2 * ranks[0]["trained_numel"]
