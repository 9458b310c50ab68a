"""Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention, MoE MLPs with a gated shared expert)
converted once at TP=1 loads at TP=2 (with sequence parallelism, which megatron's MoE layer needs
under TP), PP=2 and EP=2 (2-rank gloo) with transformers' logits (fp32, 1e-4). The model, seed
and inputs are those of ``tests/unit/test_conversion_qwen35_moe.py``, whose parity test asserts
their top-k margins.

One training step (with the load-balancing and z losses) at EP=2 and at TP=2+SP computes the
single-process loss and gradients, every GDN, router, expert and shared-expert tensor included
(the shared expert's gate weight and the GDN output norm are replicated over TP and need their
gradients summed there). As in ``test_moe_layouts``: per-micro-batch loss averaging, the same
micro-batches in every layout.
"""

import dataclasses
import os
import sys

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, os.pardir, "unit"))
sys.path.insert(0, HERE)
import test_conversion_families as fam  # noqa: E402
import test_conversion_layouts as layouts  # noqa: E402

TOLERANCE = 1e-4
pytestmark = pytest.mark.xdist_group("qwen35_moe_layouts")


def _logits_at(tp, pp, ep, sp, nemo, tokens):
    import tempfile

    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    cfg, _ = read_nemo_config(nemo)
    parallel = ParallelConfig(tp, pp, sequence_parallel=sp, expert_model_parallel_size=ep)
    initialize_model_parallel(parallel, cfg)
    chunks = build_model_chunks(cfg, to_transformer_config(cfg, parallel, "fp32"))
    local = sum(1 for n, _ in chunks[0].named_parameters() if ".local_experts." in n)
    with tempfile.TemporaryDirectory() as extracted:  # each rank extracts its own copy
        extract_nemo(nemo, extracted)
        load_nemo_weights(chunks, extracted)
        return layouts._logits(chunks, tokens), local


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from test_conversion_qwen35_moe import TOKENS, build_qwen35_moe_hf

    from nemo_aot.conversion import hf_to_nemo

    root = tmp_path_factory.mktemp("qwen35_moe_layouts")
    model = build_qwen35_moe_hf()
    tokens = fam.random_tokens(**TOKENS)
    nemo = str(root / "qwen35_moe.nemo")
    hf_to_nemo(fam.save_hf(model, root / "hf"), nemo, dtype="fp32")
    return nemo, fam.hf_logits(model, tokens), tokens


# (tp, pp, ep, sp); EP2 on two ranks is also DP2 for the attention layers
LAYOUTS = {"tp2_sp": (2, 1, 1, True), "pp2": (1, 2, 1, False), "ep2": (1, 1, 2, False)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_converted_logits_equal_hf(converted, name):
    nemo, ref, tokens = converted
    tp, pp, ep, sp = LAYOUTS[name]
    per_rank = run_multirank(_logits_at, tp * pp * max(ep // tp, 1),
                             args=(tp, pp, ep, sp, nemo, tokens), timeout=300)
    logits, local = per_rank[-1]
    if ep > 1:  # each rank holds its half of the 4 experts (fc1 + fc2 per expert and layer)
        assert all(n == 2 * 2 * 4 for _, n in per_rank), [n for _, n in per_rank]
    diff = (logits - ref).abs().max().item()
    print(f"qwen3_5_moe {name}: max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE
    if ep > 1:  # every data-parallel rank computes the same logits
        assert (per_rank[0][0] - logits).abs().max().item() <= TOLERANCE


MICRO = 4  # micro-batches of the reference (two rows each)


def tiny_qwen35_moe():
    from test_qwen35_layouts import tiny_qwen35

    return dataclasses.replace(
        tiny_qwen35(), num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
        moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True,
        moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)


def _reference(ckpt_dir, grad_dir):
    chunks, config = mu.setup(model_cfg=tiny_qwen35_moe(), per_token_loss=False)
    with torch.no_grad():  # zero-centred norms start at 0: move them so a wrong grad shows
        for name, p in chunks[0].module.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    mu.save(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=MICRO)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _layout(tp, ep, ckpt_dir, grad_dir):
    from megatron.core import parallel_state

    chunks, config = mu.setup(tp, 1, sp=tp > 1, model_cfg=tiny_qwen35_moe(), ep=ep,
                              per_token_loss=False)
    mu.load(chunks, ckpt_dir)
    dp = parallel_state.get_data_parallel_world_size()
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=MICRO // dp)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _full(directory):
    return mu.full_state(directory, model_cfg=tiny_qwen35_moe())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35_moe_ref")
    ckpt, grads = str(root / "init"), str(root / "grads")
    (total,) = run_multirank(_reference, 1, args=(ckpt, grads), timeout=240)
    (full_grads,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    return ckpt, total, full_grads


@pytest.mark.slow  # four 1-2 rank runs: about 1.5 minutes on 2 cores
@pytest.mark.parametrize("tp, ep", [(1, 2), (2, 1)], ids=["ep2", "tp2_sp"])
def test_step_matches_single_process(reference, tmp_path, tp, ep):
    ckpt, ref_total, ref_grads = reference
    grads = str(tmp_path / "grads")
    totals = run_multirank(_layout, 2, args=(tp, ep, ckpt, grads), timeout=300)
    summed = torch.stack(totals).sum(0) / tp
    assert summed[1] == ref_total[1]
    torch.testing.assert_close(summed[0], ref_total[0], rtol=1e-5, atol=1e-5)
    (full,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    assert full.keys() == ref_grads.keys()
    assert any("shared_experts.gate_weight" in k for k in full)
    assert any("out_norm" in k for k in full)
    worst = 0.0
    for key, ref in ref_grads.items():
        assert ref.abs().max() > 0, f"{key}: zero reference grad"
        worst = max(worst, (full[key] - ref).abs().max().item())
        torch.testing.assert_close(full[key], ref, rtol=1e-4, atol=1e-5, msg=key)
    print(f"qwen3_5_moe TP={tp} EP={ep}: max abs grad diff {worst:.3e}")
