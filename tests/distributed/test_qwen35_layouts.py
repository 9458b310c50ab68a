"""Qwen3.5 (hybrid Gated DeltaNet) at TP=2, PP=2 and TP=2 with sequence parallelism: the
converted model's logits equal transformers', and one training step's loss and every gradient
equal the single-process ones (the GDN output norm is shared by heads split over TP ranks, so
its gradient must be summed over TP; megatron's grad finalization does not do that for it).
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
pytestmark = pytest.mark.xdist_group("qwen35_layouts")


def tiny_qwen35():
    from nemo_aot.models.config import LinearAttention

    return dataclasses.replace(
        mu.TINY, kv_channels=32, rotary_percent=0.25, qk_layernorm=True,
        layernorm_zero_centered_gamma=True, attention_output_gate=True,
        linear_attention=LinearAttention(
            layer_types=["linear_attention", "full_attention", "linear_attention",
                         "full_attention"],
            conv_kernel_dim=4, key_head_dim=16, value_head_dim=8, num_key_heads=2,
            num_value_heads=4))


def _reference(ckpt_dir, grad_dir):
    chunks, config = mu.setup(model_cfg=tiny_qwen35())
    with torch.no_grad():  # zero-centred norms start at 0: move them so a wrong grad shows
        for name, p in chunks[0].module.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    mu.save(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _layout(tp, pp, sp, ckpt_dir, grad_dir):
    chunks, config = mu.setup(tp, pp, None, sp, model_cfg=tiny_qwen35())
    mu.load(chunks, ckpt_dir)
    total = mu.train_step(chunks, config, mu.global_batch(), num_microbatches=2)
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return total


def _full(directory):
    chunks, _ = mu.setup(model_cfg=tiny_qwen35())
    mu.load(chunks, directory)
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items()
            if not k.endswith("_extra_state")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35_ref")
    ckpt, grads = str(root / "init"), str(root / "grads")
    (total,) = run_multirank(_reference, 1, args=(ckpt, grads), timeout=240)
    (full_grads,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    return ckpt, total, full_grads


@pytest.mark.slow  # eight 1-2 rank runs: about 8 minutes on 2 cores
@pytest.mark.parametrize("tp, pp, sp", [(2, 1, False), (1, 2, False), (2, 1, True)],
                         ids=["tp2", "pp2", "tp2_sp"])
def test_step_matches_single_process(reference, tmp_path, tp, pp, sp):
    ckpt, total, full_ref = reference
    grads = str(tmp_path / "grads")
    totals = run_multirank(_layout, tp * pp, args=(tp, pp, sp, ckpt, grads), timeout=300)
    got = totals[-1]
    torch.testing.assert_close(got, total, rtol=1e-5, atol=1e-5)
    (full,) = run_multirank(_full, 1, args=(grads,), timeout=240)
    assert sorted(full) == sorted(full_ref)
    worst = max((full[k] - full_ref[k]).abs().max().item() for k in full)
    print(f"qwen3_5 TP={tp} PP={pp} SP={sp}: max abs grad diff {worst:.3e}")
    for key, ref in full_ref.items():
        torch.testing.assert_close(full[key], ref, rtol=1e-4, atol=1e-6, msg=key)
    assert any("out_norm" in k for k in full)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from test_conversion_qwen35 import build_qwen35_hf

    from nemo_aot.conversion import hf_to_nemo

    root = tmp_path_factory.mktemp("qwen35_layouts")
    model = build_qwen35_hf(seed=11)
    tokens = fam.random_tokens(seed=7)
    nemo = str(root / "qwen35.nemo")
    hf_to_nemo(fam.save_hf(model, root / "hf"), nemo, dtype="fp32")
    return {"qwen3_5": nemo}, fam.hf_logits(model, tokens), tokens


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_converted_logits_equal_hf(converted, tp, pp):
    files, ref, tokens = converted
    per_rank = run_multirank(layouts._load_all, tp * pp, args=(tp, pp, files, tokens, None),
                             timeout=300)
    diff = (per_rank[-1]["qwen3_5"] - ref).abs().max().item()
    print(f"qwen3_5: TP={tp} PP={pp} max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE
