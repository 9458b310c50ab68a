"""Tiny random models of every supported family, shared by the conversion tests.

Each family exercises one mapping feature: GQA, Llama-3.1 rope scaling, tied embeddings,
a head dimension that is not hidden/heads (Mistral-Nemo style), QKV bias (Qwen2). Weights are
re-drawn with a larger scale than transformers' init (and non-unit norms, non-zero biases) so a
wrong mapping shows in the logits. Heavy imports stay inside functions: multi-rank workers
import this module.
"""

from __future__ import annotations

import os
import shutil

import torch

import nemo_aot

TOKENIZER_DIR = os.path.join(os.path.dirname(nemo_aot.__file__), "data", "bundled", "tokenizer")
VOCAB = 300
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", dict(rope_theta=500000.0)),
    "llama31_rope": ("LlamaConfig", dict(rope_theta=10000.0, rope_scaling=LLAMA3_ROPE)),
    "llama32_tied": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None, head_dim=32)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1000000.0)),
    # QK norms, head_dim 32 != hidden/heads, tied embeddings (Qwen3-0.6B's shape of things)
    "qwen3": ("Qwen3Config", dict(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=True)),
    # (1 + w) norms, post-sublayer norms, GeGLU, embedding scale, query_pre_attn_scalar !=
    # head_dim, layer 1 sliding (window 8 < 24 tokens, local rope base), layer 2 global (linear
    # rope scaling): on separate stages at PP=2
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                        sliding_window_pattern=2, rope_theta=1000000.0,
                                        rope_local_base_freq=10000.0,
                                        rope_scaling={"rope_type": "linear", "factor": 8.0})),
}
HF_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM"}


def hf_class(family: str) -> str:
    class_name = FAMILIES[family][0]
    return HF_CLASSES.get(class_name, class_name.replace("Config", "ForCausalLM"))


def build_hf(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    import transformers

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.08)
    return model.to(dtype)


def save_hf(model, directory, **kwargs) -> str:
    directory = str(directory)
    model.save_pretrained(directory, **kwargs)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(directory, name))
    return directory


def random_tokens(seed: int = 1, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a TP=1, PP=1 megatron GPTModel, padded vocabulary columns dropped."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., :VOCAB].float()


def read_safetensors_dir(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def test_families_translate_to_the_expected_config():
    import transformers

    from nemo_aot.conversion.architectures import model_config_from_hf

    for family, (class_name, extra) in FAMILIES.items():
        hf = getattr(transformers, class_name)(**{**COMMON, **extra}).to_dict()
        hf["architectures"] = [hf_class(family)]
        arch, cfg = model_config_from_hf(hf, family)
        assert arch.hf_class == hf["architectures"][0]
        assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 176)
        assert (cfg.num_attention_heads, cfg.query_groups, cfg.vocab_size) == (4, 2, VOCAB)
        assert cfg.head_dim == extra.get("head_dim", 16)
        assert cfg.qkv_bias == (family == "qwen2")
        assert cfg.share_embeddings_and_output_weights == (family in ("llama32_tied", "qwen3",
                                                                      "gemma3"))
        assert cfg.qk_layernorm == (family in ("qwen3", "gemma3"))
        assert (cfg.rope_scaling is not None) == ("rope_scaling" in extra)
        assert cfg.rotary_base == extra.get("rope_theta", 10000.0)
        assert cfg.layernorm_epsilon == 1e-5
        gemma = family == "gemma3"
        assert (cfg.layernorm_zero_centered_gamma, cfg.post_sublayer_norms,
                cfg.scale_embeddings) == (gemma,) * 3
        assert cfg.activation == ("geglu" if gemma else "swiglu")
        if gemma:
            assert (cfg.sliding_window, cfg.window_attn_skip_freq) == (8, 2)
            assert (cfg.rotary_base_local, cfg.softmax_scale) == (10000.0, 24 ** -0.5)
            assert (cfg.rope_scaling.rope_type, cfg.rope_scaling.factor) == ("linear", 8.0)
