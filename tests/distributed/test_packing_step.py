"""A packed step equals the padded step: the same bundled preference data collated both ways
(data.pack_sequences) gives the same loss, every metric and every gradient through the AOT step,
on one rank and at TP2 (with sequence parallelism) and PP2, for paired and unpaired data under
the micro and global sort scopes. Attention is causal within each document only; RoPE depends on
relative positions only, so documents later in a packed row score as at the start of their own
row (fp32 tolerances)."""

import dataclasses

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

MODEL = dataclasses.replace(mu.TINY, vocab_size=512, encoder_seq_length=128,
                            max_position_embeddings=128)
CAPACITY = 64
CASES = {  # name -> (tp, pp, sp, kind, scope)
    "tp1_paired_micro": (1, 1, False, "paired", "micro"),
    "tp1_unpaired_global": (1, 1, False, "unpaired", "global"),
    "tp2_sp_paired_micro": (2, 1, True, "paired", "micro"),
    "pp2_unpaired_micro": (1, 2, False, "unpaired", "micro"),
}


def _steps(kind, packed, multiple):
    from nemo_aot.data import DataConfig, load_preference_data, load_tokenizer
    from nemo_aot.data.collate import collate_step

    tok = load_tokenizer("bundled:tokenizer")
    path, fmt = (("bundled:paired/train.jsonl", "auto") if kind == "paired"
                 else ("bundled:unpaired/train.jsonl", "trl_unpaired"))
    data = load_preference_data(DataConfig(train_path=path, format=fmt,
                                           tokenizer_path="bundled:tokenizer"), "train", tok)
    indices = ([([0, 1, 2, 3],), ([4, 5, 6, 7],)] if kind == "paired"
               else [([0, 1], [0, 1, 2, 3]), ([2, 3], [4, 5, 6, 7])])
    mbs = collate_step(data, indices, pad_to_multiple_of=multiple, uniform_length=True,
                       pack_capacity=CAPACITY if packed else None)
    g = torch.Generator().manual_seed(7)
    for mb in mbs:  # the same per-sequence reference log-probs in both layouts
        mb["reference_logps"] = -20 - 10 * torch.rand(mb["label"].shape[0], generator=g)
    return mbs


def _both(case):
    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig

    tp, pp, sp, kind, scope = CASES[case]
    chunks, config = mu.setup(tp, pp, sp=sp, model_cfg=MODEL, per_token_loss=False)
    loss = "dpo" if kind == "paired" else "aot_unpaired"
    out = {}
    for packed in (False, True):
        step = PreferenceStep(chunks, config, vocab_size=512, padded_vocab_size=512,
                              alignment=AlignmentConfig(loss_type=loss, sort_scope=scope, beta=0.5,
                                                        logprob_chunk_size=16))
        mbs = _steps(kind, packed, multiple=tp if sp else 1)
        rows = sum(mb["input_ids"].numel() for mb in mbs)
        metrics = step.step(mbs).metrics
        grads = {n: p.main_grad.detach().clone() for c in chunks for n, p in c.named_parameters()}
        out[packed] = (metrics, grads, rows)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_packed_step_equals_padded_step(case):
    tp, pp, *_ = CASES[case]
    for result in run_multirank(_both, tp * pp, args=(case,), timeout=300):
        (m_ref, g_ref, _), (m, g, _) = result[False], result[True]
        assert m.keys() == m_ref.keys()
        for key, value in m_ref.items():
            assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
        for name, ref in g_ref.items():
            torch.testing.assert_close(g[name], ref, rtol=1e-3, atol=1e-6,
                                       msg=lambda msg, n=name: f"{case} {n}: {msg}")
        assert sum(int(ref.abs().max() > 0) for ref in g_ref.values()) > len(g_ref) // 2
