"""Qwen3.5-MoE (hybrid Gated DeltaNet + gated attention, every MLP a mixture of experts with a
gated shared expert): HF -> .nemo -> megatron logits equal transformers' (fp32, 1e-4),
HF -> .nemo -> HF bitwise and loaded back by transformers, the fused-experts layout read to the
same model, and the published vision-language wrapper (as transformers saves it, plus an MTP
head) read for its text model.

The tiny model has both layer kinds (layer_types [linear, full, linear, full]), 4 experts with
top-2 routing and a shared expert of another width than the experts. Top-k routing is
discontinuous: seed 0 and the 70-token inputs (seed 7) leave every token's 2nd and 3rd router
logit apart by more than ``MIN_GAP`` in every layer (4.6e-3), which the test asserts on
transformers' own router logits, so a pass cannot come from a lucky tie. Weights are re-drawn
with larger scales than transformers' init (router 0.5) so that a wrong mapping, a missed
shared-expert gate or a wrong top-k normalization shows in the logits.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from test_conversion_families import (
    VOCAB,
    hf_logits,
    random_tokens,
    read_safetensors_dir,
)
from test_conversion_qwen35 import (
    LAYER_TYPES,
    _logits_of,
    convert_tiny,
    lora_equals_peft,
    round_trip,
)

TOLERANCE = 1e-4
MIN_GAP = 1e-3  # router logits; the two implementations differ by ~1e-7
TEXT = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-5,
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, layer_types=LAYER_TYPES,
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
            shared_expert_intermediate_size=40, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25})
TOKENS = dict(seed=7, seq=70)  # longer than one 64-token GDN chunk


def _redraw(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                param.normal_(0.0, 0.5)
            elif "linear_attn.norm" in name:  # a plain RMSNorm weight
                param.normal_(1.0, 0.2)
            elif name.endswith("mlp.gate.weight"):  # the router: clear top-k margins
                param.normal_(0.0, 0.5)
            elif name.endswith("shared_expert_gate.weight"):
                param.normal_(0.0, 0.3)
            else:  # zero-centred norms scale by 1 + w
                param.normal_(0.0, 0.2 if "norm" in name else 0.08)
    return model.eval()


def build_qwen35_moe_hf(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return _redraw(transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**TEXT)))


def topk_gap(model, tokens, k: int) -> float:
    """The smallest gap between a token's k-th and (k+1)-th router logit, over all layers."""
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    gaps = []
    for logits in out.router_logits:
        ranked = logits.float().sort(dim=-1, descending=True).values
        gaps.append((ranked[:, k - 1] - ranked[:, k]).min())
    assert len(gaps) == TEXT["num_hidden_layers"]
    return min(gaps).item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_tiny(build_qwen35_moe_hf(), tmp_path_factory.mktemp("qwen35_moe"))


def test_config_both_ways(converted):
    from nemo_aot.conversion.families import family_for_model, hf_config_from_model
    from nemo_aot.models.nemo_format import read_nemo_config

    cfg, _ = read_nemo_config(converted[2])
    assert cfg.linear_attention.pattern(4) == [1, 0, 1, 0]
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size,
            cfg.moe_shared_expert_intermediate_size, cfg.moe_shared_expert_gate,
            cfg.moe_router_topk_normalize, cfg.moe_router_score_function) == \
        (4, 2, 48, 40, True, True, "softmax")
    assert (cfg.attention_output_gate, cfg.qk_layernorm, cfg.layernorm_zero_centered_gamma,
            cfg.rotary_percent) == (True, True, True, 0.25)
    family = family_for_model(cfg)
    assert family.hf_class == "Qwen3_5MoeForCausalLM"
    written = hf_config_from_model(cfg, family, "float32")
    with open(os.path.join(converted[1], "config.json")) as f:
        source = json.load(f)
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "layer_types", "head_dim", "hidden_size",
                *(k for k in source if k.startswith("linear_"))):
        assert written[key] == source[key], key
    assert "intermediate_size" not in written
    import transformers

    loaded = transformers.AutoConfig.for_model(
        **{k: v for k, v in written.items() if k != "architectures"})
    assert type(loaded).__name__ == "Qwen3_5MoeTextConfig"
    assert (loaded.num_experts, loaded.shared_expert_intermediate_size) == (4, 40)


def test_megatron_logits_equal_hf(converted, tmp_path):
    model, _, nemo = converted
    tokens = random_tokens(**TOKENS)
    gap = topk_gap(model, tokens, TEXT["num_experts_per_tok"])
    assert gap > MIN_GAP, f"top-k tie within {gap:.2e}: pick another seed or input"
    ours, ref = _logits_of(nemo, tmp_path, tokens), hf_logits(model, tokens)
    assert ref.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    diff = (ours - ref).abs().max().item()
    print(f"qwen3_5_moe: TP=1 max abs logit diff {diff:.3e}, min top-k gap {gap:.2e}")
    assert diff <= TOLERANCE


def test_shared_expert_and_its_gate_count(converted, tmp_path):
    """Zeroing the shared expert's gate weight (sigmoid -> 0.5) must move transformers' logits:
    the comparison above exercises the gate, not only the routed experts."""
    import copy

    model = copy.deepcopy(converted[0])
    tokens = random_tokens(**TOKENS)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("shared_expert_gate.weight"):
                p.zero_()
    assert (hf_logits(model, tokens) - hf_logits(converted[0], tokens)).abs().max() > 1e-2


def test_round_trip_is_bitwise_and_loads_in_transformers(converted, tmp_path):
    result = round_trip(converted, tmp_path, "Qwen3_5MoeForCausalLM")
    assert any(".mlp.experts.3.down_proj." in n for n in result)  # as save_pretrained writes


@pytest.mark.parametrize("wrapped", [False, True], ids=["text", "vision_language"])
def test_fused_experts_layout_reads_the_same_model(converted, tmp_path, wrapped):
    """transformers' in-memory layout (experts stacked per layer: gate_up_proj [E, 2I, H],
    down_proj [E, H, I]), text-only or under the vision-language wrapper's names, converts to
    the same model."""
    from safetensors.torch import save_file
    from test_conversion_qwen35 import save_hf_tokenizer

    from nemo_aot.conversion import hf_to_nemo

    model, hf_dir, nemo = converted
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    if wrapped:
        fused = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                 for k, v in fused.items()}
        config = {"architectures": ["Qwen3_5MoeForConditionalGeneration"],
                  "model_type": "qwen3_5_moe", "text_config": config,
                  "tie_word_embeddings": False}
    directory = tmp_path / "fused"
    os.makedirs(directory)
    save_file(fused, str(directory / "model.safetensors"))
    with open(directory / "config.json", "w") as g:
        json.dump(config, g)
    save_hf_tokenizer(directory)
    out = str(tmp_path / "fused.nemo")
    hf_to_nemo(str(directory), out, dtype="fp32")
    tokens = random_tokens(**TOKENS)
    assert torch.equal(_logits_of(out, tmp_path / "a", tokens),
                       _logits_of(nemo, tmp_path / "b", tokens))


def test_fused_experts_of_another_orientation_are_refused_by_name(converted, tmp_path):
    """Experts stacked as [E, H, 2I] (Qwen3-VL-MoE's hub orientation) are not this layout:
    refused before anything is built, naming the tensor and the shape the config implies."""
    from safetensors.torch import save_file
    from test_conversion_qwen35 import save_hf_tokenizer

    from nemo_aot.conversion import hf_to_nemo

    model, hf_dir, _ = converted
    tensors = {k: (v.transpose(1, 2) if k.endswith("experts.gate_up_proj") else v).contiguous()
               for k, v in model.state_dict().items()}
    directory = tmp_path / "transposed"
    os.makedirs(directory)
    save_file(tensors, str(directory / "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f, \
            open(directory / "config.json", "w") as g:
        g.write(f.read())
    save_hf_tokenizer(directory)
    with pytest.raises(ValueError, match=r"wrong shapes: model\.layers\.0\.mlp\.experts\."
                                         r"gate_up_proj \(4, 64, 96\) \(config implies "
                                         r"\(4, 96, 64\)\)"):
        hf_to_nemo(str(directory), str(tmp_path / "x.nemo"), dtype="fp32")


def test_vision_language_layout_reads_the_text_model(converted, tmp_path, caplog):
    """The published layout, as transformers saves Qwen3_5MoeForConditionalGeneration (a tiny
    vision tower), plus an MTP head: the text model converts, the rest is left out and said
    so, and export writes the text-only model."""
    import transformers
    from safetensors.torch import load_file, save_file
    from test_conversion_qwen35 import save_hf_tokenizer

    from nemo_aot.conversion import hf_to_nemo, nemo_to_hf

    model, hf_dir, _ = converted
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=TEXT["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    config = transformers.Qwen3_5MoeConfig(text_config=TEXT, vision_config=vision)
    vl = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    text_state = {k: v for k, v in model.state_dict().items()}
    missing = vl.model.language_model.load_state_dict(
        {k[len("model."):]: v for k, v in text_state.items() if k.startswith("model.")})
    assert not missing.missing_keys and not missing.unexpected_keys
    vl.lm_head.load_state_dict(model.lm_head.state_dict())
    vl_dir = tmp_path / "vl"
    vl.save_pretrained(vl_dir)
    tensors = load_file(str(vl_dir / "model.safetensors"))
    assert any(k.startswith("model.visual.") for k in tensors)
    tensors["mtp.layers.0.mlp.shared_expert.down_proj.weight"] = torch.zeros(8, 8)
    tensors["mtp.fc.weight"] = torch.zeros(8, 16)
    save_file(tensors, str(vl_dir / "model.safetensors"))
    save_hf_tokenizer(vl_dir)
    visual = sum(k.startswith("model.visual.") for k in tensors)
    nemo = str(tmp_path / "vl.nemo")
    with caplog.at_level(logging.WARNING, logger="nemo_aot.conversion.engine"):
        hf_to_nemo(str(vl_dir), nemo, dtype="fp32")
    assert f"left out {visual} tensors under model.visual." in caplog.text
    assert "left out 2 tensors under mtp." in caplog.text
    tokens = random_tokens(**TOKENS)
    diff = (_logits_of(nemo, tmp_path, tokens) - hf_logits(model, tokens)).abs().max().item()
    assert diff <= TOLERANCE
    back = str(tmp_path / "back")
    nemo_to_hf(nemo, back)
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3_5MoeForCausalLM"]
    source, result = read_safetensors_dir(hf_dir), read_safetensors_dir(back)
    assert sorted(source) == sorted(result)
    assert all(torch.equal(source[n], result[n]) for n in source)


def test_lora_on_attention_and_gdn_exports_to_peft(converted, tmp_path):
    """Adapters on every attention and GDN projection of the MoE model (LoRA on routed
    experts is refused for every MoE model): megatron's logits equal PEFT's over the
    transformers model, and the folder reads back to the same adapters."""
    model, _, nemo = converted
    lora_equals_peft(model, nemo, ["linear_qkv", "linear_proj", "in_proj", "out_proj"],
                     tmp_path, "qwen3_5_moe")


@pytest.mark.parametrize("key, value, match", [
    ("num_experts", 0, "num_experts"),
    ("shared_expert_intermediate_size", None, "shared_expert_intermediate_size"),
    ("num_experts_per_tok", 5, "moe_router_topk"),
    ("attention_bias", True, "attention_bias"),
])
def test_refusals_name_the_key(converted, key, value, match):
    from nemo_aot.conversion.families import model_config_from_hf

    with open(os.path.join(converted[1], "config.json")) as f:
        hf = json.load(f)
    hf[key] = value
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(hf, "config.json")


def test_export_refuses_what_the_family_cannot_say(converted):
    import dataclasses

    from nemo_aot.conversion.families import REGISTRY, family_for_model, hf_config_from_model
    from nemo_aot.models.nemo_format import read_nemo_config

    cfg, _ = read_nemo_config(converted[2])
    family = REGISTRY["Qwen3_5MoeForCausalLM"]
    for change, key in [(dict(moe_router_topk_normalize=False), "moe_router_topk_normalize"),
                        (dict(moe_shared_expert_gate=False), "moe_shared_expert_gate"),
                        (dict(moe_shared_expert_intermediate_size=None,
                              moe_shared_expert_gate=False),
                         "moe_shared_expert_intermediate_size")]:
        with pytest.raises(ValueError, match=key):
            hf_config_from_model(dataclasses.replace(cfg, **change), family, "float32")
    dense = dataclasses.replace(cfg, num_moe_experts=None, moe_ffn_hidden_size=None,
                                moe_shared_expert_intermediate_size=None,
                                moe_shared_expert_gate=False)
    assert family_for_model(dense).hf_class == "Qwen3_5ForCausalLM"


def test_recipe_resolves_and_refuses_what_the_hybrid_spec_cannot_build():
    from nemo_aot.algorithms.resolve import World, resolve_run

    base = ["recipe=qwen3_5_35b_a3b", "init_from=null", "data.train_path=x",
            "data.validation_path=null", "data.tokenizer_path=bundled:tokenizer"]
    model = resolve_run(base, world=World.planned()).config.model
    assert model.linear_attention.pattern(40)[:4] == [1, 1, 1, 0]
    assert (model.num_moe_experts, model.moe_router_topk, model.moe_shared_expert_gate) == \
        (256, 8, True)
    with pytest.raises(ValueError, match="pack_sequences.*GatedDeltaNet takes no document"):
        resolve_run([*base, "data.pack_sequences=true"], world=World.planned())
    with pytest.raises(ValueError, match="moe_grouped_gemm.*local spec only"):
        resolve_run([*base, "model.moe_grouped_gemm=true"], world=World.planned())
