"""GPU numerics of the fast paths against the plain ones, in bf16 (and FP8 where TE exists).

* SDPA core attention (``SDPAttention``: flash / memory-efficient kernels) vs megatron's unfused
  ``DotProductAttention`` (materialized [b, heads, s, s] scores, fp32 softmax): both measured
  against an fp32 reference; SDPA must be as close as the unfused path, in values and in grads.
* Chunked vocab-parallel log-probs vs a plain ``log_softmax`` over bf16 logits: equal values and
  grads, and the chunked path never holds a [tokens, vocab] fp32 tensor (peak memory).
* One AOT step through megatron's schedule with the TransformerEngine spec in bf16 and under FP8:
  finite loss and grads, FP8 loss close to the bf16 one.

Skipped without CUDA; the FP8 test also without TransformerEngine or below compute capability
8.9. Run: ``pytest -m gpu tests/gpu``.
"""

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = "cuda"


@pytest.fixture(scope="module")
def world():
    """A world of one with megatron-core's parallel state (NCCL on a GPU host)."""
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), None, seed=1234)
    yield


# ---------------------------------------------------------------------------- attention
def _attention_config(heads, groups, dim):
    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.config import GPTModelConfig, to_transformer_config

    cfg = GPTModelConfig(num_layers=1, hidden_size=heads * dim, ffn_hidden_size=4 * heads * dim,
                         num_attention_heads=heads, num_query_groups=groups)
    return to_transformer_config(cfg, ParallelConfig(), "bf16")


def _reference_attention(q, k, v, masked):
    """fp32 softmax(q k^T / sqrt(d)) v with GQA; q [s, b, h, d], k/v [s, b, g, d] -> [s, b, h*d]."""
    s, b, h, d = q.shape
    rep = h // k.shape[2]
    qf, kf, vf = (t.float().permute(1, 2, 0, 3) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(masked, float("-inf"))
    out = torch.softmax(scores, -1) @ vf
    return out.permute(2, 0, 1, 3).reshape(s, b, h * d)


def _run_attention(module, q, k, v, mask, weight):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    (out.float() * weight).sum().backward()
    return out.float(), [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("explicit_mask", [False, True], ids=["causal", "explicit_mask"])
def test_sdpa_attention_matches_unfused_in_bf16(world, explicit_mask):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_aot.models.layer_specs import SDPAttention

    seq, batch, heads, groups, dim = 256, 2, 8, 2, 64
    config = _attention_config(heads, groups, dim)
    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(seq, batch, n, dim, device=CUDA, generator=g).to(torch.bfloat16)
               for n in (heads, groups, groups))
    weight = torch.randn(seq, batch, heads * dim, device=CUDA, generator=g)
    causal = torch.ones(seq, seq, device=CUDA, dtype=torch.bool).triu(1)  # True = masked out
    mask = causal.expand(batch, 1, seq, seq).contiguous() if explicit_mask else None

    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference = _reference_attention(qr, kr, vr, causal)
    (reference * weight).sum().backward()
    ref_grads = [t.grad for t in (qr, kr, vr)]

    modules = {name: cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                         attention_type="self").to(CUDA)
               for name, cls in (("sdpa", SDPAttention), ("unfused", DotProductAttention))}
    errors = {}
    for name, module in modules.items():
        out, grads = _run_attention(module, q, k, v, mask, weight)
        errors[name] = [(out - reference.detach()).abs().max().item()] + [
            (gr - ref).abs().max().item() / ref.abs().max().item()
            for gr, ref in zip(grads, ref_grads)]
    # values: bf16 output rounding (~4e-3 relative) on O(1) outputs
    assert errors["sdpa"][0] < 2e-2, errors
    for i, what in enumerate(("output", "dq", "dk", "dv")):
        assert errors["sdpa"][i] <= 2 * errors["unfused"][i] + 1e-2, (what, errors)


# ---------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("padded", [0, 128])
def test_chunked_logprobs_match_log_softmax_in_bf16(padded):
    from nemo_aot.models.logprobs import vocab_parallel_logprobs

    rows, seq, vocab, chunk = 4, 512, 32000, 64
    g = torch.Generator(device=CUDA).manual_seed(1)
    logits = (torch.randn(rows, seq, vocab + padded, device=CUDA, generator=g) * 4).to(
        torch.bfloat16)
    target = torch.randint(0, vocab, (rows, seq), device=CUDA, generator=g)
    weight = torch.randn(rows, seq, device=CUDA, generator=g)
    full_fp32 = rows * seq * vocab * 4

    def measured(fn):
        z = logits.detach().clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn(z)
        (out * weight).sum().backward()
        torch.cuda.synchronize()
        return out.detach(), z.grad, torch.cuda.max_memory_allocated() - base

    chunked, chunked_grad, chunked_peak = measured(lambda z: vocab_parallel_logprobs(
        z, target, vocab_size=vocab, chunk_tokens=chunk))
    plain, plain_grad, plain_peak = measured(lambda z: torch.log_softmax(
        z[..., :vocab].float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1))

    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked_grad[..., :vocab].float(), plain_grad[..., :vocab].float(),
                               rtol=1.6e-2, atol=1e-3)
    if padded:
        assert torch.all(chunked_grad[..., vocab:] == 0)
    # the point of chunking: no [tokens, vocab] fp32 tensor (the plain path holds at least one)
    assert plain_peak > full_fp32
    assert chunked_peak < 0.75 * full_fp32, (chunked_peak, full_fp32)


# ---------------------------------------------------------------------------- FP8 step
def _te_step(model_cfg, fp8, state=None):
    """One AOT step (TE spec, bf16 or FP8) on fixed data; returns (metrics, grads, state)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from mcore_utils import PreferenceStep, preference_rows
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.losses.config import AlignmentConfig
    from nemo_aot.models.aot_model import fp8_overrides
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.options import PrecisionConfig

    precision = PrecisionConfig(precision="bf16", transformer_impl="transformer_engine", fp8=fp8)
    precision.validate()
    precision.check_runtime()
    parallel = ParallelConfig()
    initialize_model_parallel(parallel, model_cfg, seed=1234)
    config = to_transformer_config(model_cfg, parallel, "bf16", **fp8_overrides(precision))
    (chunk,) = build_model_chunks(model_cfg, config, "transformer_engine")
    chunk = chunk.cuda()
    if state is not None:
        chunk.load_state_dict(state, strict=False)
    state = {k: v.detach().clone() for k, v in chunk.state_dict().items()
             if not k.endswith("_extra_state")}
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, average_in_collective=False), chunk)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    step = PreferenceStep([ddp], config, vocab_size=model_cfg.vocab_size,
                          padded_vocab_size=model_cfg.padded_vocab_size(1),
                          alignment=AlignmentConfig(loss_type="aot_unpaired", sort_scope="micro"))
    # 8 rows x 64 tokens: token counts and widths are multiples of 16, as FP8 GEMMs need
    batch = preference_rows(4, 4, seed=0, seq=64, vocab=model_cfg.vocab_size)
    metrics = step.step([{k: v.to(CUDA) for k, v in batch.items()}]).metrics
    grads = [p.main_grad.float().clone() for p in ddp.module.parameters() if p.requires_grad]
    return metrics, grads, state


@pytest.mark.te
def test_aot_step_under_fp8_matches_bf16(world):
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (Ada/Hopper/Blackwell)")
    from nemo_aot.models.config import GPTModelConfig

    model_cfg = GPTModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256,
                               num_attention_heads=4, num_query_groups=2, vocab_size=512,
                               encoder_seq_length=64, max_position_embeddings=64)
    bf16, bf16_grads, state = _te_step(model_cfg, None)
    fp8, fp8_grads, _ = _te_step(model_cfg, "hybrid", state)
    for metrics, grads in ((bf16, bf16_grads), (fp8, fp8_grads)):
        assert math.isfinite(metrics["loss"])
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert fp8["loss"] == pytest.approx(bf16["loss"], rel=0.05, abs=1e-2)
    norm = lambda gs: torch.sqrt(sum((g ** 2).sum() for g in gs)).item()  # noqa: E731
    assert norm(fp8_grads) == pytest.approx(norm(bf16_grads), rel=0.2)
