"""``alignment.logprobs_from=hidden_states`` (no logits tensor) gives the loss, every metric and
every gradient of ``logprobs_from=logits`` (megatron's own output layer), on the same weights and
micro-batches, at TP2, TP2 with sequence parallelism, and with tied embeddings at TP2 and
PP2 (the output weight is then the embedding's, on the last stage a copy kept in sync)."""

import dataclasses

import pytest
import torch

import mcore_utils as mu
from multirank import run_multirank

LAYOUTS = {  # name -> (tp, pp, sequence parallel, tied embeddings)
    "tp2": (2, 1, False, False),
    "tp2_sp": (2, 1, True, False),
    "tp2_tied": (2, 1, False, True),
    "pp2_tied": (1, 2, False, True),
}


def _both(layout):
    from mcore_utils import PreferenceStep
    from nemo_aot.losses.config import AlignmentConfig

    tp, pp, sp, tied = LAYOUTS[layout]
    model_cfg = dataclasses.replace(mu.TINY, share_embeddings_and_output_weights=tied)
    chunks, config = mu.setup(tp, pp, sp=sp, model_cfg=model_cfg, per_token_loss=False)
    micro_batches = [mu.preference_rows(2, 3, seed=i) for i in range(2)]
    out = {}
    for source in ("logits", "hidden_states"):
        step = PreferenceStep(chunks, config, vocab_size=250, padded_vocab_size=256,
                              alignment=AlignmentConfig(loss_type="aot_unpaired", beta=0.5,
                                                        logprob_chunk_size=7, logprobs_from=source))
        metrics = step.step(micro_batches).metrics
        grads = {n: p.main_grad.detach().clone() for c in chunks for n, p in c.named_parameters()}
        out[source] = (metrics, grads)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hidden_states_equal_logits(layout):
    tp, pp, _, _ = LAYOUTS[layout]
    for result in run_multirank(_both, tp * pp, args=(layout,), timeout=300):
        (m_ref, g_ref), (m, g) = result["logits"], result["hidden_states"]
        assert m.keys() == m_ref.keys()
        for key, value in m_ref.items():
            assert m[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
        assert g.keys() == g_ref.keys()
        for name, ref in g_ref.items():
            torch.testing.assert_close(g[name], ref, rtol=1e-4, atol=1e-6,
                                       msg=lambda msg, n=name: f"{layout} {n}: {msg}")
        assert sum(int(ref.abs().max() > 0) for ref in g_ref.values()) > len(g_ref) // 2
