"""Outputs others must load: a LoRA run's PEFT adapter names the Hugging Face base it was
trained on (the folder or hub id its init_from .nemo was converted from), so
``AutoPeftModelForCausalLM`` loads it; where that is unknown the export says what to pass."""

import json
import os
import shutil

import pytest
import torch

from nemo_aot.algorithms import adapters as adapters_module
from nemo_aot.algorithms.config import AOTConfig
from nemo_aot.conversion.convert import HF_SOURCE_MEMBER, hf_base_of, hf_to_nemo
from nemo_aot.conversion.peft_adapter import adapter_config, write_peft_adapter
from nemo_aot.data.config import resolve_path
from nemo_aot.models.nemo_format import read_nemo_config
from nemo_aot.models.options import PeftConfig

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _shapes(cfg):
    """(in, out) of each adapted megatron weight (fused QKV and gate/up)."""
    kv = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    return {"linear_qkv": (cfg.hidden_size, (heads + 2 * groups) * kv),
            "linear_proj": (heads * kv, cfg.hidden_size),
            "linear_fc1": (cfg.hidden_size, 2 * cfg.ffn_hidden_size),
            "linear_fc2": (cfg.ffn_hidden_size, cfg.hidden_size)}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    hf_dir = root / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    spec = json.loads((hf_dir / "config.json").read_text())
    spec["_name_or_path"] = "example-org/tiny-llama"  # as a hub download's config names it
    (hf_dir / "config.json").write_text(json.dumps(spec))
    tok = resolve_path("bundled:tokenizer")
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), hf_dir / name)
    nemo = root / "tiny.nemo"
    hf_to_nemo(str(hf_dir), str(nemo), dtype="fp32")
    return hf_dir, nemo


def _adapters(cfg, r=2):
    g = torch.Generator().manual_seed(0)
    return {(i, t): (torch.randn(r, n_in, generator=g) * 0.01, torch.randn(n_out, r, generator=g))
            for i in range(cfg.num_layers) for t, (n_in, n_out) in _shapes(cfg).items()}


def test_the_converted_nemo_records_its_origin_and_the_adapter_loads_by_itself(converted,
                                                                                 tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    hf_dir, nemo = converted
    assert hf_base_of(str(nemo)) == str(hf_dir)
    cfg = read_nemo_config(str(nemo))[0]
    out = tmp_path / "adapter"
    write_peft_adapter(str(out), _adapters(cfg), cfg,
                       adapter_config(2, 4.0, 0.0, TARGETS, hf_base_of(str(nemo))))
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))  # no base passed by hand
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    name = "model.layers.0.self_attn.q_proj.weight"
    loaded = dict(model.get_base_model().named_parameters())
    weight = next(v for k, v in loaded.items() if k.endswith(name.replace(".weight",
                                                                           ".base_layer.weight")))
    assert torch.equal(weight, dict(base.named_parameters())[name])


def test_a_moved_base_folder_falls_back_to_the_hub_id(converted, tmp_path):
    hf_dir, nemo = converted
    moved = tmp_path / "moved"
    shutil.move(str(hf_dir), moved)
    try:
        assert hf_base_of(str(nemo)) == "example-org/tiny-llama"
    finally:
        shutil.move(str(moved), hf_dir)


def test_without_a_known_origin_the_export_says_what_to_pass(tmp_path, monkeypatch, caplog):
    nemo = resolve_path("bundled:tiny_sft.nemo")  # made by the project, never converted
    assert hf_base_of(nemo) is None
    model = read_nemo_config(nemo)[0]
    import nemo_aot.models.lora as lora

    monkeypatch.setattr(lora, "full_adapters", lambda chunks: _adapters(model))
    cfg = AOTConfig(model=model, peft=PeftConfig(scheme="lora", rank=2, alpha=4.0,
                                                 target_modules=TARGETS))
    out = tmp_path / "adapter"
    with caplog.at_level("WARNING", logger="nemo_aot.algorithms.adapters"):
        adapters_module.export_adapter(None, cfg, str(out), base_model="bundled:tiny_sft.nemo")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] is None  # never a .nemo path
    assert "nemo-aot convert nemo-to-hf --nemo bundled:tiny_sft.nemo --out BASE" in caplog.text
    assert "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE)" in caplog.text


def test_the_origin_member_is_small_json(converted):
    import tarfile

    _, nemo = converted
    with tarfile.open(nemo) as tar:
        names = [m.name.lstrip("./") for m in tar.getmembers()]
    assert HF_SOURCE_MEMBER in names
