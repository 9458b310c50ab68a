"""Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention, MoE MLPs with a gated shared expert)
converted once at TP=1 loads at TP=2 (with sequence parallelism, which megatron's MoE layer needs
under TP), PP=2 and EP=2 (2-rank gloo) with transformers' logits (fp32, 1e-4). The model, seed and inputs are those of
``tests/unit/test_conversion_qwen35_moe.py``, whose parity test asserts their top-k margins.
"""

import os
import sys

import pytest

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
