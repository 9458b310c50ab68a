"""One AOT step gives the loss and gradients of a single process on the matching sort groups.

Reference semantics, checked here against independent single-process runs:
  micro          one sort per micro-batch; the step loss is their mean
  data_parallel  micro-batch k of every DP rank forms one sort group
  global         the whole global batch is one sort group
so each parallel run is compared with a one-rank run whose micro-batches are those sort groups.
"""

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

N_POS, N_NEG = 2, 3  # unpaired micro-batches with n != m (exact merged-grid transport)


def _micro_batches(count, offset=0, paired=False, length_normalize=False):
    n_neg = N_POS if paired else N_NEG
    mbs = [mu.preference_rows(N_POS, n_neg, seed=offset + i, paired=paired) for i in range(count)]
    for mb in mbs:
        if length_normalize:  # per-token reference log-probs, as attach_reference gives them
            mb["reference_logps"] = mb["reference_logps"] / mb["loss_mask"].sum(-1)
    return mbs


def _alignment(scope, loss_type, length_normalize=False):
    from nemo_aot.losses.config import AlignmentConfig

    return AlignmentConfig(loss_type=loss_type, sort_scope=scope, beta=0.1, logprob_chunk_size=7,
                           length_normalize=length_normalize)


def _run(tp, pp, scope, loss_type, groups, ckpt_dir, grad_dir, save_init, length_normalize=False):
    """groups: list over DP ranks of lists of micro-batches."""
    from megatron.core import parallel_state

    from nemo_aot.models.aot_step import AOTStep

    chunks, config = mu.setup(tp, pp, per_token_loss=False)
    if save_init:
        mu.save(chunks, ckpt_dir)
    else:
        mu.load(chunks, ckpt_dir)
    step = AOTStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                   alignment=_alignment(scope, loss_type, length_normalize))
    metrics = step.step(groups[parallel_state.get_data_parallel_rank()]).metrics
    mu.grads_into_params(chunks)
    mu.save(chunks, grad_dir)
    return metrics


def _full(directory):
    return mu.full_state(directory)


def _compare(tmp_path, world, tp, pp, scope, loss_type, groups, reference_micro,
             length_normalize=False):
    init, ref_g, run_g = (str(tmp_path / n) for n in ("init", "ref_grads", "run_grads"))
    (ref,) = run_multirank(_run, 1, args=(1, 1, "micro", loss_type, [reference_micro], init,
                                          ref_g, True, length_normalize), timeout=240)
    out = run_multirank(_run, world, args=(tp, pp, scope, loss_type, groups, init, run_g, False,
                                           length_normalize), timeout=300)
    for metrics in out:
        assert metrics.keys() == ref.keys()
        assert {"logps/chosen", "logits/chosen", "rewards/margins",
                "rewards/accuracies"} <= ref.keys()
        assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        for key, value in ref.items():   # every metric, TRL's included: exact reduction
            assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
    (a,) = run_multirank(_full, 1, args=(ref_g,), timeout=240)
    (b,) = run_multirank(_full, 1, args=(run_g,), timeout=240)
    nonzero = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=2e-4, atol=2e-6,
                                   msg=lambda m, k=key: f"{k}: {m}")
        nonzero += int(a[key].abs().max() > 0)
    assert nonzero > len(a) // 2, "reference gradients are mostly zero: the test would be vacuous"


def test_micro_scope_tp2_paired(tmp_path):
    micro = _micro_batches(2, paired=True)
    _compare(tmp_path, 2, 2, 1, "micro", "aot_paired", [micro, micro], micro)


def test_micro_scope_pp2_unpaired(tmp_path):
    micro = _micro_batches(2)
    _compare(tmp_path, 2, 1, 2, "micro", "aot_unpaired", [micro, micro], micro)


def test_data_parallel_scope_dp2_is_one_sort_per_micro_batch_index(tmp_path):
    rank0, rank1 = _micro_batches(2, 0), _micro_batches(2, 10)
    merged = [mu.merge_rows([rank0[k], rank1[k]]) for k in range(2)]
    _compare(tmp_path, 2, 1, 1, "data_parallel", "aot_unpaired", [rank0, rank1], merged)


def test_global_scope_dp2_is_one_sort_over_the_global_batch(tmp_path):
    rank0, rank1 = _micro_batches(2, 0), _micro_batches(2, 10)
    merged = [mu.merge_rows(rank0 + rank1)]
    _compare(tmp_path, 2, 1, 1, "global", "aot_unpaired", [rank0, rank1], merged)


@pytest.mark.parametrize("scope", ["data_parallel", "global"])
def test_length_normalized_dp2_gathers_the_token_counts(tmp_path, scope):
    """The loss sorts per-token means; the metrics (TRL's names) use token sums on every layout."""
    rank0 = _micro_batches(2 if scope == "data_parallel" else 1, 0, length_normalize=True)
    rank1 = _micro_batches(len(rank0), 10, length_normalize=True)
    merged = ([mu.merge_rows([rank0[k], rank1[k]]) for k in range(2)] if scope == "data_parallel"
              else [mu.merge_rows(rank0 + rank1)])
    _compare(tmp_path, 2, 1, 1, scope, "aot_unpaired", [rank0, rank1], merged,
             length_normalize=True)


def test_global_scope_four_micro_batches_equal_one(tmp_path):
    micro = _micro_batches(4, 0)
    _compare(tmp_path, 1, 1, 1, "global", "aot_unpaired", [micro], [mu.merge_rows(micro)])


def _one_sided(scope):
    from nemo_aot.models.aot_step import AOTStep

    chunks, config = mu.setup(per_token_loss=False)
    step = AOTStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                   alignment=_alignment(scope, "aot_unpaired"))
    # only rejected samples (a validation batch once the positives ran out), then only chosen
    negatives = [mu.preference_rows(0, 3, seed=i) for i in range(2)]
    positives = [mu.preference_rows(2, 0, seed=i) for i in range(2)]
    out = [step.step(negatives, forward_only=True).metrics,
           step.step(positives, forward_only=True).metrics,
           step.step(negatives).metrics]
    grads = [p.main_grad.abs().max().item() for c in chunks for p in c.parameters()
             if getattr(p, "main_grad", None) is not None]
    return out, max(grads)


@pytest.mark.parametrize("scope", ["micro", "global"])
def test_one_sided_batches_add_nothing(scope):
    (result,) = run_multirank(_one_sided, 1, args=(scope,), timeout=240)
    metrics, grad = result
    assert metrics == [{}, {}, {}]
    assert grad == 0.0
