"""HF -> .nemo -> megatron logits == HF logits; HF -> .nemo -> HF is bitwise; CLI wiring.

Runs in this process: each conversion sets up (and tears down) a torch.distributed world of one.
"""

import argparse
import json
import os

import pytest
import torch
from test_conversion_families import (
    FAMILIES,
    WRAPPED,
    build_hf,
    hf_class,
    hf_logits,
    megatron_logits,
    random_tokens,
    read_safetensors_dir,
    save_hf,
    save_wrapped_v5,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from nemo_aot.conversion import hf_to_nemo

    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in [*FAMILIES, *WRAPPED]:
        model = build_hf(family)
        save = save_wrapped_v5 if family == "gemma3_vl_v5" else save_hf
        hf_dir = save(model, root / family / "hf")
        nemo = str(root / family / "model.nemo")
        hf_to_nemo(hf_dir, nemo, dtype="fp32")
        out[family] = (model, hf_dir, nemo)
    return out


def _load_single(nemo, tmp_path):
    from nemo_aot.conversion.convert import build_single_model
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    cfg, _ = read_nemo_config(nemo)
    extracted = extract_nemo(nemo, str(tmp_path / "extracted"))
    model = build_single_model(cfg, torch.float32)
    load_nemo_weights([model], extracted)
    return model


@pytest.mark.parametrize("family", [*FAMILIES, *WRAPPED])
def test_megatron_logits_equal_hf(converted, family, tmp_path):
    from nemo_aot.conversion.convert import single_process_world

    model, _, nemo = converted[family]
    tokens = random_tokens()
    with single_process_world():
        ours = megatron_logits(_load_single(nemo, tmp_path), tokens)
    ref = hf_logits(model, tokens)
    assert ref.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    diff = (ours - ref).abs().max().item()
    print(f"{family}: TP=1 max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE, f"{family}: max abs logit diff {diff:.3e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bitwise_and_loads_in_transformers(converted, family, tmp_path):
    import transformers

    from nemo_aot.conversion import nemo_to_hf

    model, hf_dir, nemo = converted[family]
    back = str(tmp_path / "back")
    nemo_to_hf(nemo, back)
    source, result = read_safetensors_dir(hf_dir), read_safetensors_dir(back)
    assert sorted(result) == sorted(source)
    for name, tensor in source.items():
        assert result[name].dtype == tensor.dtype and torch.equal(result[name], tensor), name
    with open(os.path.join(hf_dir, "config.json")) as f:
        original = json.load(f)
    loaded = transformers.AutoConfig.from_pretrained(back)
    for key in ("hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size",
                "tie_word_embeddings", "head_dim", "rms_norm_eps"):
        if key in original:
            assert getattr(loaded, key) == original[key], key
    with open(os.path.join(back, "config.json")) as f:
        exported = json.load(f)
    # transformers 4.x spelling next to 5.x's, with the same values
    rope = original["rope_parameters"]
    if "full_attention" in rope:  # per layer type (Gemma 3): 4.x keys describe the global ones
        assert exported["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", original.get("rope_theta"))
    assert exported["rope_theta"] == theta and exported["torch_dtype"] == "float32"
    scaling = exported["rope_scaling"]
    assert (scaling or {}).get("factor") == rope.get("factor")
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    tokens = random_tokens(seed=3)
    assert torch.equal(hf_logits(again, tokens), hf_logits(model, tokens))
    assert transformers.AutoTokenizer.from_pretrained(back)("a1+2")["input_ids"]
    assert os.path.isfile(os.path.join(back, "generation_config.json"))


@pytest.mark.parametrize("family", list(WRAPPED))
def test_vision_language_gemma3_exports_its_text_model(converted, family, tmp_path, caplog):
    """Gemma3ForConditionalGeneration -> .nemo (vision tower and projector left out, and said
    so) -> a text-only Gemma3ForCausalLM whose logits equal the wrapper's text-only forward."""
    import logging

    import transformers

    from nemo_aot.conversion import hf_to_nemo, nemo_to_hf

    model, hf_dir, _ = converted[family]
    source = read_safetensors_dir(hf_dir)
    towers = ("vision_tower.", "multi_modal_projector.")
    if family == "gemma3_vl_v5":
        towers = tuple("model." + t for t in towers)
    with caplog.at_level(logging.WARNING, logger="nemo_aot.conversion"):
        hf_to_nemo(hf_dir, str(tmp_path / "again.nemo"), dtype="fp32")
        back = str(tmp_path / "back")
        nemo_to_hf(str(tmp_path / "again.nemo"), back)
    for tower in towers:
        count = sum(n.startswith(tower) for n in source)
        assert count and f"left out {count} tensors under {tower}" in caplog.text
    assert "writing the text-only Gemma3ForCausalLM" in caplog.text
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Gemma3ForCausalLM"]
    prefix = "model.language_model." if family == "gemma3_vl_v5" else "language_model.model."
    result = read_safetensors_dir(back)
    assert sorted(result) == sorted("model." + n[len(prefix):] for n in source
                                    if n.startswith(prefix))
    for name, tensor in result.items():
        assert torch.equal(tensor, source[prefix + name[len("model."):]]), name
    text_only = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(text_only).__name__ == "Gemma3ForCausalLM"
    tokens = random_tokens(seed=3)
    ref = hf_logits(model, tokens)  # the wrapper, input_ids only
    diff = (hf_logits(text_only, tokens) - ref).abs().max().item()
    print(f"{family}: exported Gemma3ForCausalLM vs Gemma3ForConditionalGeneration text "
          f"forward: max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("family", ["qwen2", "qwen3_5"])
def test_bf16_sharded_source_round_trips_bitwise(family, tmp_path):
    """Many small shards in and out (with an index); bf16 stays bf16 bit for bit (Qwen3.5: the
    GDN's A_log, dt_bias and conv1d too)."""
    from nemo_aot.conversion import hf_to_nemo
    from nemo_aot.conversion.convert import nemo_to_hf

    if family == "qwen3_5":
        from test_conversion_qwen35 import build_qwen35_hf

        model = build_qwen35_hf(seed=5).to(torch.bfloat16)
    else:
        model = build_hf(family, seed=5, dtype=torch.bfloat16)
    hf_dir = save_hf(model, tmp_path / "hf", max_shard_size="40KB")
    assert len([n for n in os.listdir(hf_dir) if n.endswith(".safetensors")]) > 3
    nemo = str(tmp_path / "m.nemo")
    hf_to_nemo(hf_dir, nemo, dtype="bf16")
    back = str(tmp_path / "back")
    nemo_to_hf(nemo, back, max_shard_bytes=60_000)
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    source, result = read_safetensors_dir(hf_dir), read_safetensors_dir(back)
    assert sorted(result) == sorted(source)
    assert all(result[k].dtype == torch.bfloat16 and torch.equal(result[k], v)
               for k, v in source.items())
    with open(os.path.join(back, "config.json")) as f:
        assert json.load(f).get("dtype", "bfloat16") == "bfloat16"


@pytest.mark.parametrize("family", ["llama31_rope", "qwen3", "gemma3"])
def test_generated_config_when_no_source_config_is_stored(converted, family, tmp_path):
    """A .nemo without hf_config/ (trained from scratch) exports a generated config."""
    import tarfile

    import transformers

    from nemo_aot.conversion import nemo_to_hf

    model, _, nemo = converted[family]
    stripped = str(tmp_path / "stripped.nemo")
    with tarfile.open(nemo) as src, tarfile.open(stripped, "w") as dst:
        for member in src.getmembers():
            if not member.name.startswith("hf_config"):
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    back = str(tmp_path / "back")
    nemo_to_hf(stripped, back)
    config = transformers.AutoConfig.from_pretrained(back)
    assert config.architectures == [hf_class(family)]
    again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    tokens = random_tokens(seed=4)
    assert torch.equal(hf_logits(again, tokens), hf_logits(model, tokens))


def test_cli_converts_and_reports_user_errors(converted, tmp_path, capsys):
    from nemo_aot.conversion.cli import register

    parser = argparse.ArgumentParser(prog="nemo-aot")
    register(parser.add_subparsers(dest="command", required=True))
    _, hf_dir, nemo = converted["mistral"]
    out = str(tmp_path / "cli.nemo")
    args = parser.parse_args(["convert", "hf-to-nemo", "--hf", hf_dir, "--out", out,
                              "--dtype", "fp32"])
    assert args.func(args) == 0 and os.path.isfile(out)
    args = parser.parse_args(["convert", "nemo-to-hf", "--nemo", out, "--out",
                              str(tmp_path / "cli_hf")])
    assert args.func(args) == 0
    assert os.path.isfile(str(tmp_path / "cli_hf" / "model.safetensors"))
    args = parser.parse_args(["convert", "hf-to-nemo", "--hf", str(tmp_path / "nowhere"),
                              "--out", str(tmp_path / "x.nemo")])
    assert args.func(args) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "hf-to-nemo", "--hf", hf_dir, "--out", out,
                           "--dtype", "fp16"])


@pytest.mark.parametrize("change", [
    dict(sliding_window=None, window_attn_skip_freq=None, rotary_base_local=None),
    dict(rotary_base_local=1000000.0), dict(softmax_scale=None), dict(scale_embeddings=False),
    dict(rope_scaling=None), dict(window_attn_skip_freq=None)], ids=str)
def test_each_gemma3_option_shows_in_the_logits(converted, change, tmp_path):
    """The tiny Gemma 3 exercises every option: dropping one moves the logits far past the
    tolerance (the equality test above could not pass with it mapped wrongly)."""
    import dataclasses

    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config

    model, _, nemo = converted["gemma3"]
    cfg, _ = read_nemo_config(nemo)
    tokens = random_tokens()
    with single_process_world():
        wrong = build_single_model(dataclasses.replace(cfg, **change), torch.float32)
        load_nemo_weights([wrong], extract_nemo(nemo, str(tmp_path / "x")))
        diff = (megatron_logits(wrong, tokens) - hf_logits(model, tokens)).abs().max().item()
    assert diff > 100 * TOLERANCE, (change, diff)


@pytest.mark.parametrize("family", ["llama_gqa", "qwen3", "gemma3"])
def test_lora_adapters_load_in_peft_with_equal_logits(converted, family, tmp_path):
    """LoRA on every target of a converted model (adapters with non-zero B), exported in the
    PEFT layout, loaded by ``peft`` onto the transformers model: equal logits. For Gemma 3 the
    o_proj/down_proj deltas land before the post-sublayer norms, as in PEFT."""
    from peft import PeftModel

    from nemo_aot.conversion.convert import single_process_world
    from nemo_aot.conversion.peft_adapter import adapter_config, write_peft_adapter
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.lora import adapted_layers, full_adapters, is_adapter_name
    from nemo_aot.models.nemo_format import extract_nemo, load_nemo_weights, read_nemo_config
    from nemo_aot.models.options import PeftConfig

    model, hf_dir, nemo = converted[family]
    cfg, _ = read_nemo_config(nemo)
    peft = PeftConfig(scheme="lora", rank=4, alpha=8.0)
    tokens = random_tokens(seed=5)
    with single_process_world():
        parallel = ParallelConfig()
        initialize_model_parallel(parallel, cfg)
        (chunk,) = build_model_chunks(cfg, to_transformer_config(cfg, parallel, "fp32"),
                                      peft=peft, seed=3)
        load_nemo_weights([chunk], extract_nemo(nemo, str(tmp_path / "x")),
                          select=lambda name: not is_adapter_name(name))
        generator = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for _, _, module in adapted_layers([chunk]):
                weight = module.adapter.linear_out.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
        ours = megatron_logits(chunk.eval(), tokens)
        adapters = full_adapters([chunk])
    folder = str(tmp_path / "adapter")
    write_peft_adapter(folder, adapters, cfg, adapter_config(
        peft.rank, peft.alpha, 0.0, list(peft.target_modules)))
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    plain = hf_logits(base, tokens)
    adapted = hf_logits(PeftModel.from_pretrained(base, folder).eval(), tokens)
    diff = (ours - adapted).abs().max().item()
    print(f"{family}: LoRA vs PEFT max abs logit diff {diff:.3e}")
    assert diff <= TOLERANCE
    assert (adapted - plain).abs().max() > 1e-1  # the adapters change the model
