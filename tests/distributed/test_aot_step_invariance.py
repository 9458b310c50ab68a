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

    from mcore_utils import PreferenceStep

    chunks, config = mu.setup(tp, pp, per_token_loss=False)
    if save_init:
        mu.save(chunks, ckpt_dir)
    else:
        mu.load(chunks, ckpt_dir)
    step = PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
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
    from mcore_utils import PreferenceStep

    chunks, config = mu.setup(per_token_loss=False)
    step = PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
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


# ---------------------------------------------------------------- the SFT term
# loss = preference loss + w * NLL of the chosen responses, one token mean over the step's chosen
# tokens. Reference: one process, the sort groups as micro-batches with the term off, plus w
# times the gradient of a brute-force NLL (full log_softmax) over every chosen row of the step.
# Every loss type under every sort scope at DP2 (two micro-batches per rank); at TP2 (one DP
# rank, two micro-batches) every loss type under micro, and global.
SFT_WEIGHT = 0.5
LOSS_TYPES = ("aot_unpaired", "aot_paired", "dpo", "ipo")
SFT_LAYOUTS = {  # name -> (tp, dp) on two ranks, [(scope, loss type)]
    "tp2": (2, 1, [("micro", t) for t in LOSS_TYPES] + [("global", "aot_paired")]),
    "dp2": (1, 2, [(scope, t) for scope in ("micro", "data_parallel") for t in LOSS_TYPES]
            + [("global", "aot_unpaired"), ("global", "aot_paired")]),
}


def _sft_data(loss_type, dp):
    """Every DP rank's micro-batches (ipo: per-token references under length_normalize)."""
    paired = loss_type != "aot_unpaired"
    return [_micro_batches(2, 10 * r, paired=paired, length_normalize=loss_type == "ipo")
            for r in range(dp)]


def _sort_groups(scope, ranks):
    if scope == "micro":
        return [mb for rank in ranks for mb in rank]
    if scope == "data_parallel":
        return [mu.merge_rows(list(group)) for group in zip(*ranks)]
    return [mu.merge_rows([mb for rank in ranks for mb in rank])]


def _sft_step(chunks, config, scope, loss_type, weight, micro_batches):
    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig

    alignment = AlignmentConfig(loss_type=loss_type, sort_scope=scope, beta=0.1,
                                logprob_chunk_size=7, length_normalize=loss_type == "ipo",
                                sft_loss_weight=weight)
    step = PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                          alignment=alignment)
    return step.step(micro_batches).metrics


def _brute_force_nll(chunk, micro_batches):
    """NLL of the chosen rows, log_softmax over the true vocabulary, token mean over all of them."""
    chosen = mu.merge_rows(micro_batches)
    chosen = {k: v[chosen["label"]] for k, v in chosen.items()}
    logits = chunk(chosen["input_ids"], chosen["position_ids"], None)[..., :250].float()
    token = torch.log_softmax(logits, -1).gather(-1, chosen["labels"].unsqueeze(-1)).squeeze(-1)
    return -(token * chosen["loss_mask"]).sum() / chosen["loss_mask"].sum()


def _sft_reference(init_dir, out_dir):
    chunks, config = mu.setup(per_token_loss=False)
    mu.save(chunks, init_dir)
    metrics = {}
    for layout, (_, dp, cases) in SFT_LAYOUTS.items():
        for scope, loss_type in cases:
            mu.load(chunks, init_dir)
            ranks = _sft_data(loss_type, dp)
            m = _sft_step(chunks, config, scope, loss_type, 0.0, _sort_groups(scope, ranks))
            nll = _brute_force_nll(chunks[0], [mb for rank in ranks for mb in rank])
            (SFT_WEIGHT * nll).backward()   # the DDP hooks add it to the step's main_grad
            metrics[layout, scope, loss_type] = {**m, "nll_loss": nll.item(),
                                                 "loss": m["loss"] + SFT_WEIGHT * nll.item()}
            mu.grads_into_params(chunks)
            mu.save(chunks, f"{out_dir}/{layout}_{scope}_{loss_type}")
    return metrics


def _sft_layout(layout, init_dir, out_dir):
    from megatron.core import parallel_state

    tp, dp, cases = SFT_LAYOUTS[layout]
    chunks, config = mu.setup(tp, per_token_loss=False)
    metrics = {}
    for scope, loss_type in cases:
        mu.load(chunks, init_dir)
        mine = _sft_data(loss_type, dp)[parallel_state.get_data_parallel_rank()]
        metrics[layout, scope, loss_type] = _sft_step(chunks, config, scope, loss_type,
                                                      SFT_WEIGHT, mine)
        mu.grads_into_params(chunks)
        mu.save(chunks, f"{out_dir}/{layout}_{scope}_{loss_type}")
    return metrics


def _full_states(directories):
    return {d: mu.full_state(d) for d in directories}


def test_sft_term_every_loss_type_and_scope_equals_one_process(tmp_path):
    init, ref_dir, run_dir = (str(tmp_path / n) for n in ("init", "ref", "run"))
    (ref,) = run_multirank(_sft_reference, 1, args=(init, ref_dir), timeout=300)
    for layout in SFT_LAYOUTS:
        for got in run_multirank(_sft_layout, 2, args=(layout, init, run_dir), timeout=300):
            for case, metrics in got.items():
                assert metrics.keys() == ref[case].keys(), case
                for key, value in ref[case].items():
                    assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5,
                                                         nan_ok=True), (case, key)
    names = [f"{layout}_{scope}_{loss_type}" for layout, (_, _, cases) in SFT_LAYOUTS.items()
             for scope, loss_type in cases]
    (states,) = run_multirank(_full_states, 1, args=([f"{d}/{n}" for d in (ref_dir, run_dir)
                                                      for n in names],), timeout=300)
    for name in names:
        a, b = states[f"{ref_dir}/{name}"], states[f"{run_dir}/{name}"]
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=2e-4, atol=2e-6,
                                       msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
