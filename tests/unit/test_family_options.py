"""The family options' spec extensions on their own: where each module goes in a layer spec
(megatron's local spec, and a TE-shaped one with stand-in classes: TransformerEngine is absent
here, so the TE variant is checked as configuration only), the local RoPE angles bit for bit,
the sliding-window mask against brute force, and the TransformerConfig switches."""

import dataclasses

import pytest
import torch

from nemo_aot.models.config import GPTModelConfig, RopeScaling, to_transformer_config

GEMMA_LIKE = GPTModelConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
    num_query_groups=2, vocab_size=256, qk_layernorm=True, layernorm_zero_centered_gamma=True,
    post_sublayer_norms=True, scale_embeddings=True, activation="geglu", softmax_scale=0.2,
    sliding_window=8, window_attn_skip_freq=2, rotary_base_local=10000.0,
    rope_scaling=RopeScaling(factor=8.0, rope_type="linear"))


class StandInNorm(torch.nn.Module):
    def __init__(self, config, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))


@pytest.mark.parametrize("spec_kind", ["local", "te_shaped"])
def test_options_put_their_modules_in_the_spec(spec_kind):
    from megatron.core.tensor_parallel import RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    from nemo_aot.models.family_options import LocalRopeSelfAttention, apply_layer_options
    from nemo_aot.models.layer_specs import RMSNorm, local_layer_spec

    spec = local_layer_spec()
    norm = RMSNorm
    if spec_kind == "te_shaped":  # TE's classes in TE's places, as stand-ins
        norm = StandInNorm
        row = type("TERowParallelLinear", (RowParallelLinear,), {})
        spec.submodules.self_attention.submodules.linear_proj = row
        spec.submodules.mlp.submodules.linear_fc2 = row
    assert apply_layer_options(spec, dataclasses.replace(
        GEMMA_LIKE, qk_layernorm=False, post_sublayer_norms=False, sliding_window=None,
        window_attn_skip_freq=None, rotary_base_local=None), norm) is spec  # nothing to do
    out = apply_layer_options(spec, GEMMA_LIKE, norm)
    attention = out.submodules.self_attention
    assert attention.module is LocalRopeSelfAttention
    assert attention.params["local_rotary_base"] == 10000.0
    assert attention.params["global_inv0"] == 1 / 8
    assert attention.submodules.q_layernorm is norm and attention.submodules.k_layernorm is norm
    for layer in (attention.submodules.linear_proj, out.submodules.mlp.submodules.linear_fc2):
        base = spec.submodules.self_attention.submodules.linear_proj
        assert issubclass(layer, base) and layer.post_norm is norm
    # the input spec is untouched (the LoRA wrapping before it deep-copies too)
    assert spec.submodules.self_attention.submodules.q_layernorm is IdentityOp


def test_local_rope_angles_are_those_of_the_local_base_bit_for_bit():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from nemo_aot.distributed.cpu_support import enable_cpu_execution
    from nemo_aot.models.family_options import local_rotary_emb, rope_inv_freq

    enable_cpu_execution()  # megatron's rotary embedding names the CUDA device

    dim = 16
    global_rope = RotaryEmbedding(dim, 1.0, rotary_base=1000000, use_cpu_initialization=True)
    global_rope.inv_freq = global_rope.inv_freq / 8.0  # linear scaling, as the model applies it
    local_rope = RotaryEmbedding(dim, 1.0, rotary_base=10000, use_cpu_initialization=True)
    for length in (7, 4096):
        got = local_rotary_emb(global_rope(length), 1 / 8.0, rope_inv_freq(10000.0, dim))
        assert torch.equal(got, local_rope(length))
    shifted = global_rope(64)[40:]  # positions that do not start at 0 (a context-parallel slice)
    assert torch.equal(local_rotary_emb(shifted, 1 / 8.0, rope_inv_freq(10000.0, dim)),
                       local_rope(64)[40:])


def test_window_mask_matches_brute_force():
    from nemo_aot.models.layer_specs import _window_mask

    for sq, sk, window in [(12, 12, (7, 0)), (5, 12, (3, 0)), (6, 6, (2, 1))]:
        mask = _window_mask(sq, sk, window, "cpu")
        for i in range(sq):
            for j in range(sk):
                q = i + sk - sq
                assert mask[i, j] == (q - window[0] <= j <= q + window[1]), (i, j, window)


def test_transformer_config_switches():
    from nemo_aot.distributed.parallel import ParallelConfig

    config = to_transformer_config(GEMMA_LIKE, ParallelConfig())
    assert config.window_size == (7, 0) and config.window_attn_skip_freq == 2
    assert config.qk_layernorm and config.layernorm_zero_centered_gamma
    assert config.softmax_scale == 0.2
    x = torch.linspace(-3, 3, 11)
    assert torch.equal(config.activation_func(x),
                       torch.nn.functional.gelu(x, approximate="tanh"))
    plain = to_transformer_config(dataclasses.replace(
        GEMMA_LIKE, sliding_window=None, window_attn_skip_freq=None, rotary_base_local=None),
        ParallelConfig())
    assert plain.window_size is None


@pytest.mark.parametrize("change, key", [
    (dict(activation="relu"), "activation"),
    (dict(rope_scaling=RopeScaling(rope_type="yarn")), "rope_scaling.rope_type"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=None), "sliding_window"),  # skip freq / local base without a window
    (dict(window_attn_skip_freq=1), "window_attn_skip_freq"),
    (dict(attention_backend="unfused"), "attention_backend"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
])
def test_bad_family_options_name_the_key(change, key):
    with pytest.raises(ValueError, match=f"model.{key}"):
        dataclasses.replace(GEMMA_LIKE, **change).validate()
