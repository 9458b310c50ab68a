"""The router losses of a mixture-of-experts policy see real tokens only: padding a step's
micro-batches wider (as pipeline parallelism's uniform step length or sequence parallelism's
pad_to_multiple_of does) changes neither the logged load-balancing and z losses nor the loss, and
at TP2 with sequence parallelism - where the padding falls unevenly on the two sequence shards -
they equal the single process's (the z-loss is the mean over the micro-batch's real tokens,
not the mean of the shards' means; the logged z-loss is averaged over the TP ranks), also on
the second stage of TP2 x PP2, which gets the mask split over the sequence shards by the policy
runner (megatron splits it on the first stage only; unsplit, the router fails on its shape).

The fast check of what tests/e2e/test_moe_layout_curves.py proves over several CLI steps."""

import dataclasses

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

MOE = dataclasses.replace(
    mu.TINY, num_layers=2, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
    qk_layernorm=True, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
LENGTHS = [(16, 9, 12, 14), (11, 16, 10, 7)]  # real tokens per row, two micro-batches


def _micro_batches(width):
    """Two micro-batches of four rows with the real lengths above, right-padded to ``width``."""
    out = []
    for seed, lengths in enumerate(LENGTHS):
        mb = mu.preference_rows(2, 2, seed=seed)
        seq = mb["input_ids"].shape[1]
        lengths = torch.tensor(lengths)
        real = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
        mb["loss_mask"] = mb["loss_mask"] * real
        extra = width - seq
        for key in ("input_ids", "labels"):
            mb[key] = torch.cat([mb[key] * real, torch.zeros(4, extra, dtype=torch.int64)], 1)
        mb["loss_mask"] = torch.cat([mb["loss_mask"], torch.zeros(4, extra)], 1)
        mb["position_ids"] = torch.arange(width).expand(4, width).contiguous()
        mb["seq_lengths"] = lengths
        out.append(mb)
    return out


def _step(tp, width, ckpt_dir, save, pp=1):
    from nemo_aot.losses.config import AlignmentConfig
    from nemo_aot.models.router_metrics import router_loss_metrics

    chunks, config = mu.setup(tp, pp, sp=tp > 1, model_cfg=MOE, per_token_loss=False)
    if save:
        mu.save(chunks, ckpt_dir)
    else:
        mu.load(chunks, ckpt_dir)
    step = mu.PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                             alignment=AlignmentConfig(loss_type="aot_unpaired",
                                                       sort_scope="micro"))
    metrics = dict(step.step(_micro_batches(width)).metrics)
    metrics.update(router_loss_metrics(len(LENGTHS), MOE.num_layers))
    return {k: metrics.get(k) for k in ("loss", "moe/load_balancing_loss", "moe/z_loss")}


def _check(results, expected):
    for got in results:  # every rank logs the router losses; the last stage has the loss
        for key, value in expected.items():
            if key != "loss" or got[key] is not None:
                assert got[key] == pytest.approx(value, rel=1e-5), key
    assert any(got["loss"] is not None for got in results)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("moe_padding") / "init")
    (narrow,) = run_multirank(_step, 1, args=(1, 16, ckpt, True), timeout=240)
    return ckpt, narrow


def test_wider_padding_changes_no_router_loss(reference):
    ckpt, narrow = reference
    (wide,) = run_multirank(_step, 1, args=(1, 24, ckpt, False), timeout=240)
    assert narrow["moe/z_loss"] > 0 and narrow["moe/load_balancing_loss"] > 0
    for key, value in narrow.items():
        assert wide[key] == pytest.approx(value, rel=1e-5), key


def test_sequence_parallel_shards_give_the_single_process_router_losses(reference):
    ckpt, narrow = reference
    _check(run_multirank(_step, 2, args=(2, 24, ckpt, False), timeout=300), narrow)


@pytest.mark.slow
@pytest.mark.xdist_group("moe_padding")
def test_later_pipeline_stages_get_the_padding_mask_split_over_sequence_shards(reference):
    """megatron splits the mask over the sequence-parallel ranks on the first stage only."""
    ckpt, narrow = reference
    _check(run_multirank(_step, 4, args=(2, 24, ckpt, False, 2), timeout=400), narrow)
