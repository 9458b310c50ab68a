"""Qwen3.5 dense (hybrid Gated DeltaNet + gated attention): HF -> .nemo -> megatron logits equal
transformers' (fp32), HF -> .nemo -> HF bitwise, and the published vision-language layout read
for its text model (vision tower and MTP head left out, and said so).

The tiny model has every Qwen3.5 feature: layer_types mixing both layer kinds, gated attention
with GQA, QK norms, partial RoPE (0.25), zero-centred norms, grouped GDN heads (4 value heads
over 2 key heads), conv1d, A_log/dt_bias. Weights are re-drawn with larger scales than
transformers' init so a wrong mapping shows in the logits.
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
    megatron_logits,
    random_tokens,
    read_safetensors_dir,
    save_hf,
)

TOLERANCE = 1e-4
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=256, rms_norm_eps=1e-5, linear_conv_kernel_dim=4,
            linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, layer_types=LAYER_TYPES, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25})


def build_qwen35_hf(seed: int = 0):
    import transformers

    config = transformers.Qwen3_5TextConfig(**TEXT)
    torch.manual_seed(seed)
    model = transformers.Qwen3_5ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                param.normal_(0.0, 0.5)
            elif "linear_attn.norm" in name:  # a plain RMSNorm weight
                param.normal_(1.0, 0.2)
            else:  # zero-centred norms scale by 1 + w
                param.normal_(0.0, 0.2 if "norm" in name else 0.08)
    return model


def convert_tiny(model, root):
    """(model, its saved HF folder, the fp32 .nemo converted from it) under ``root``."""
    from nemo_aot.conversion import hf_to_nemo

    hf_dir = save_hf(model, root / "hf")
    nemo = str(root / "model.nemo")
    hf_to_nemo(hf_dir, nemo, dtype="fp32")
    return model, hf_dir, nemo


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_tiny(build_qwen35_hf(), tmp_path_factory.mktemp("qwen35"))


def _logits_of(nemo, tmp_path, tokens):
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    cfg, _ = read_nemo_config(nemo)
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        load_nemo_weights([model], extract_nemo(nemo, str(tmp_path / "extracted")))
        return megatron_logits(model, tokens)


def test_config_read_from_layer_types(converted):
    from nemo_aot.models.nemo_format import read_nemo_config

    cfg, _ = read_nemo_config(converted[2])
    assert cfg.linear_attention.pattern(4) == [1, 0, 1, 0]
    assert (cfg.rotary_percent, cfg.head_dim, cfg.attention_output_gate, cfg.qk_layernorm,
            cfg.layernorm_zero_centered_gamma) == (0.25, 32, True, True, True)
    assert (cfg.linear_attention.num_key_heads, cfg.linear_attention.num_value_heads) == (2, 4)


def test_megatron_logits_equal_hf(converted, tmp_path):
    model, _, nemo = converted
    tokens = random_tokens(seq=70)  # longer than one 64-token GDN chunk
    ours, ref = _logits_of(nemo, tmp_path, tokens), hf_logits(model, tokens)
    assert ref.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    diff = (ours - ref).abs().max().item()
    print(f"qwen3_5: TP=1 max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE


def round_trip(converted, tmp_path, hf_class: str) -> dict:
    """.nemo -> HF equals the source folder tensor for tensor, and transformers loads it as
    ``hf_class`` with the source model's logits; returns the exported tensors."""
    import transformers

    from nemo_aot.conversion import nemo_to_hf

    model, hf_dir, nemo = converted
    back = str(tmp_path / "back")
    nemo_to_hf(nemo, back)
    source, result = read_safetensors_dir(hf_dir), read_safetensors_dir(back)
    assert sorted(source) == sorted(result)
    for name, tensor in source.items():
        assert torch.equal(tensor, result[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == hf_class
    tokens = random_tokens()
    assert torch.equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
    return result


def test_round_trip_is_bitwise_and_loads_in_transformers(converted, tmp_path):
    round_trip(converted, tmp_path, "Qwen3_5ForCausalLM")


def _vision_language_layout(model, directory) -> str:
    """The published layout: text config under text_config, the language model's weights
    under model.language_model., a vision tower and an MTP head next to them."""
    from safetensors.torch import save_file

    os.makedirs(directory)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        tensors[name] = tensor.contiguous()
    tensors["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(8, 8)
    tensors["model.visual.merger.linear_fc1.weight"] = torch.zeros(8, 8)
    tensors["mtp.layers.0.mlp.down_proj.weight"] = torch.zeros(8, 8)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    text = model.config.to_dict()
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "text_config": text, "vision_config": {"depth": 1},
              "tie_word_embeddings": False}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return save_hf_tokenizer(directory)


def save_hf_tokenizer(directory) -> str:
    import shutil

    from test_conversion_families import TOKENIZER_DIR

    for name in os.listdir(TOKENIZER_DIR):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(directory, name))
    return str(directory)


def test_vision_language_layout_reads_the_text_model(converted, tmp_path, caplog):
    from nemo_aot.conversion import hf_to_nemo, nemo_to_hf

    model, hf_dir, _ = converted
    vl_dir = _vision_language_layout(model, tmp_path / "vl")
    nemo = str(tmp_path / "vl.nemo")
    with caplog.at_level(logging.WARNING, logger="nemo_aot.conversion.engine"):
        hf_to_nemo(vl_dir, nemo, dtype="fp32")
    said = caplog.text
    assert "left out 2 tensors under model.visual." in said
    assert "left out 1 tensors under mtp." in said
    tokens = random_tokens()
    diff = (_logits_of(nemo, tmp_path, tokens) - hf_logits(model, tokens)).abs().max().item()
    assert diff <= TOLERANCE
    back = str(tmp_path / "back")
    nemo_to_hf(nemo, back)  # written as the text-only model
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3_5ForCausalLM"]
    source = read_safetensors_dir(hf_dir)
    result = read_safetensors_dir(back)
    assert sorted(source) == sorted(result)
    assert all(torch.equal(source[n], result[n]) for n in source)


@pytest.mark.parametrize("key, value, match", [
    ("hidden_act", "gelu", "hidden_act"),
    ("attention_bias", True, "attention_bias"),
    ("layer_types", ["linear_attention"] * 3, "layer_types"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
     "rope_type"),
])
def test_refusals_name_the_key(converted, key, value, match):
    from nemo_aot.conversion.families import model_config_from_hf

    _, hf_dir, _ = converted
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    hf[key] = value
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(hf, "config.json")


LORA_TARGETS = ["linear_qkv", "linear_proj", "in_proj", "out_proj", "linear_fc1", "linear_fc2"]


def test_lora_on_attention_and_gdn_exports_to_peft(converted, tmp_path):
    """Random (non-zero) adapters on every projection of both layer kinds: megatron's logits
    equal those of PEFT's LoraModel over the transformers model with the exported folder, and
    the folder reads back to the same adapters."""
    model, _, nemo = converted
    lora_equals_peft(model, nemo, LORA_TARGETS, tmp_path, "qwen3_5")


def lora_equals_peft(model, nemo, targets, tmp_path, name):
    """Random adapters on ``targets`` of the converted ``nemo``: megatron's logits equal PEFT's
    over ``model`` with the exported folder, which reads back to the same adapters."""
    import copy

    from peft import PeftModel

    from nemo_aot.conversion.convert import single_process_world
    from nemo_aot.conversion.peft_adapter import (
        adapter_config,
        read_peft_adapter,
        write_peft_adapter,
    )
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.lora import adapted_layers, full_adapters, is_adapter_name
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config
    from nemo_aot.models.options import PeftConfig

    cfg, _ = read_nemo_config(nemo)
    peft = PeftConfig(scheme="lora", rank=4, alpha=8.0, target_modules=targets)
    tokens = random_tokens(seq=20)
    with single_process_world():
        parallel = ParallelConfig()
        initialize_model_parallel(parallel, cfg)
        (chunk,) = build_model_chunks(cfg, to_transformer_config(cfg, parallel, "fp32"),
                                      peft=peft)
        load_nemo_weights([chunk], extract_nemo(nemo, str(tmp_path / "x")),
                          select=lambda name: not is_adapter_name(name))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, _, layer in adapted_layers([chunk]):
                for w in (layer.adapter.linear_in.weight, layer.adapter.linear_out.weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)
        kinds = {t for _, t, _ in adapted_layers([chunk])}
        assert kinds == set(targets)
        ours = megatron_logits(chunk.eval(), tokens)
        adapters = full_adapters([chunk])
    folder = str(tmp_path / "adapter")
    write_peft_adapter(folder, adapters, cfg, adapter_config(4, 8.0, 0.0, targets))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    ref, base = hf_logits(peft_model, tokens), hf_logits(model, tokens)
    assert (ref - base).abs().max() > 1e-2, "the adapters must change the logits"
    diff = (ours - ref).abs().max().item()
    print(f"{name} LoRA: max abs logit diff against PEFT {diff:.3e}")
    assert diff <= TOLERANCE
    back = read_peft_adapter(folder, cfg, 4, 8.0, targets)
    assert back.keys() == adapters.keys()
    assert all(torch.equal(back[k][i], adapters[k][i]) for k in back for i in (0, 1))


def test_recipe_resolves_and_packing_is_refused_with_the_reason():
    from nemo_aot.algorithms.resolve import World, resolve_run

    base = ["recipe=qwen3_5_9b", "init_from=null", "data.train_path=x",
            "data.validation_path=null", "data.tokenizer_path=bundled:tokenizer"]
    run = resolve_run(base, world=World.planned())
    assert run.config.model.linear_attention.pattern(32)[:4] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="pack_sequences.*GatedDeltaNet takes no document"):
        resolve_run([*base, "data.pack_sequences=true"], world=World.planned())
    with pytest.raises(ValueError, match="transformer_impl=local"):
        from nemo_aot.models.gpt import _block_spec

        _block_spec(run.config.model, None, "transformer_engine", None, None, None)
