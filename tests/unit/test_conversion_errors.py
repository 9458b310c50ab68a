"""Broken or unsupported inputs fail up front with a message naming the problem, and leave
no output (nor any staging file) behind."""

import json
import os

import pytest
import torch
from test_conversion_families import build_hf, save_hf


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A Llama checkpoint in several shards with an index (HF's own sharded layout)."""
    root = tmp_path_factory.mktemp("sharded")
    return save_hf(build_hf("llama_gqa"), root / "hf", max_shard_size="40KB")


def _copy(src, dst):
    import shutil

    return shutil.copytree(src, dst)


def _edit_config(hf_dir, **changes):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as f:
        json.dump(config, f)


def _convert_fails(hf_dir, tmp_path, match):
    from nemo_aot.conversion import hf_to_nemo

    out_dir = tmp_path / "out"
    out_dir.mkdir(parents=True)
    with pytest.raises(ValueError, match=match) as info:
        hf_to_nemo(str(hf_dir), str(out_dir / "model.nemo"), dtype="fp32")
    assert os.listdir(out_dir) == [], "a failed conversion left files behind"
    return str(info.value)


def test_missing_shard_is_named(sharded_llama, tmp_path):
    hf = _copy(sharded_llama, tmp_path / "hf")
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(hf, shard))
    message = _convert_fails(hf, tmp_path, "missing shard")
    assert shard in message


def test_wrong_shapes_are_named(sharded_llama, tmp_path):
    hf = _copy(sharded_llama, tmp_path / "hf")
    _edit_config(hf, intermediate_size=160)
    message = _convert_fails(hf, tmp_path, "wrong shapes")
    assert "model.layers.0.mlp.gate_proj.weight (176, 64) (config implies (160, 64))" in message


def test_missing_and_extra_tensors_are_named(sharded_llama, tmp_path):
    hf = _copy(sharded_llama, tmp_path / "hf")
    _edit_config(hf, num_hidden_layers=3)
    assert "model.layers.2.self_attn.q_proj.weight" in _convert_fails(hf, tmp_path / "a",
                                                                      "missing tensors")
    _edit_config(hf, num_hidden_layers=1)
    assert "model.layers.1.mlp.down_proj.weight" in _convert_fails(hf, tmp_path / "b",
                                                                   "unexpected tensors")


def test_tampered_index_is_refused(sharded_llama, tmp_path):
    hf = _copy(sharded_llama, tmp_path / "hf")
    index = os.path.join(hf, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"]["model.norm.weight"] = "../outside.safetensors"
    with open(index, "w") as f:
        json.dump(data, f)
    _convert_fails(hf, tmp_path, "outside the directory")


@pytest.mark.parametrize("changes, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*not supported"),
    ({"architectures": None}, "architectures=.*not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
    ({"rope_parameters": None, "rope_theta": 1e4,
      "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "lacks .*low_freq_factor"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_unsupported_config_fields_are_refused(sharded_llama, tmp_path, changes, match):
    hf = _copy(sharded_llama, tmp_path / "hf")
    _edit_config(hf, **changes)
    _convert_fails(hf, tmp_path, match)


def test_sliding_window_only_refused_when_in_use():
    from nemo_aot.conversion.architectures import model_config_from_hf

    base = {"architectures": ["MistralForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 4096}
    model_config_from_hf({**base, "sliding_window": None})
    model_config_from_hf({**base, "sliding_window": 4096})  # covers every position: unused
    with pytest.raises(ValueError, match="sliding_window=1024"):
        model_config_from_hf({**base, "sliding_window": 1024})
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 1024}
    model_config_from_hf({**qwen, "use_sliding_window": False})
    with pytest.raises(ValueError, match="sliding_window=1024"):
        model_config_from_hf({**qwen, "use_sliding_window": True})
    with pytest.raises(ValueError, match="layer_types"):
        model_config_from_hf({**base, "layer_types": ["full_attention", "sliding_attention"]})


def test_pickled_bin_weights_are_refused(sharded_llama, tmp_path):
    hf = _copy(sharded_llama, tmp_path / "hf")
    for name in os.listdir(hf):
        if name.startswith("model"):
            os.remove(os.path.join(hf, name))
    with open(os.path.join(hf, "pytorch_model.bin"), "wb") as f:
        f.write(b"never unpickled")
    _convert_fails(hf, tmp_path, r"pickled \.bin weights")


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path):
    """Fails mid-conversion (after the model is built): still no output left behind."""
    hf = save_hf(build_hf("llama_gqa"), tmp_path / "hf")
    _edit_config(hf, tie_word_embeddings=True)
    _convert_fails(hf, tmp_path, "differs from model.embed_tokens")


def test_missing_tokenizer_and_bad_dtype_are_refused(tmp_path):
    from nemo_aot.conversion import hf_to_nemo

    hf = save_hf(build_hf("qwen2"), tmp_path / "hf")
    with pytest.raises(ValueError, match="dtype must be one of"):
        hf_to_nemo(hf, str(tmp_path / "x.nemo"), dtype="fp16")
    for name in os.listdir(hf):
        if name.startswith("tokenizer"):
            os.remove(os.path.join(hf, name))
    _convert_fails(hf, tmp_path, "no tokenizer files")


def test_export_refuses_a_non_empty_directory(tmp_path):
    from nemo_aot.conversion import hf_to_nemo, nemo_to_hf

    hf = save_hf(build_hf("qwen2"), tmp_path / "hf")
    nemo = str(tmp_path / "m.nemo")
    hf_to_nemo(hf, nemo, dtype="fp32")
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        nemo_to_hf(nemo, str(out))
    assert os.listdir(out) == ["keep.txt"]
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == [], leftovers
    assert torch.__version__  # the conversion left torch.distributed as it found it
    assert not torch.distributed.is_initialized()


def test_qwen3_and_gemma3_refuse_what_they_cannot_represent():
    """By key and value: each refusal names the config field."""
    from nemo_aot.conversion.architectures import model_config_from_hf

    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "vocab_size": 100, "max_position_embeddings": 4096}
    qwen3 = {**base, "architectures": ["Qwen3ForCausalLM"]}
    assert model_config_from_hf(qwen3)[1].qk_layernorm
    for changes, match in [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
        ({"use_sliding_window": True, "sliding_window": 1024}, "sliding_window=1024"),
    ]:
        with pytest.raises(ValueError, match=match):
            model_config_from_hf({**qwen3, **changes})
    gemma = {**base, "architectures": ["Gemma3ForCausalLM"], "sliding_window": 512,
             "sliding_window_pattern": 2}
    cfg = model_config_from_hf(gemma)[1]
    assert (cfg.window_attn_skip_freq, cfg.sliding_window) == (2, 512)
    every_third = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    assert model_config_from_hf({**gemma, "num_hidden_layers": 6, "layer_types": every_third}
                                )[1].window_attn_skip_freq == 3
    for changes, match in [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
        ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "'yarn'"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
         "sliding_attention.rope_type='linear'"),
        ({"architectures": ["Gemma2ForCausalLM"]}, "soft-caps"),
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "vision-language"),
    ]:
        with pytest.raises(ValueError, match=match):
            model_config_from_hf({**gemma, **changes})
