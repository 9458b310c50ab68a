"""Qwen3-MoE and Mixtral: tiny random transformers models convert into megatron-core models
whose logits equal transformers' (fp32, 1e-4), and back bit for bit.

Top-k routing is discontinuous: two experts whose router probabilities tie within rounding
would make the two implementations pick different experts for reasons that say nothing about
the conversion. The seeds and inputs here leave every token's k-th and (k+1)-th router
logit apart by more than ``MIN_GAP`` in every layer, and the test asserts it (transformers'
own router logits), so a pass cannot come from a lucky tie."""

import dataclasses

import pytest
import torch

MIN_GAP = 1e-3  # router logits; the conversions differ by ~1e-7
TOL = 1e-4


def _tiny(family, seed):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, head_dim=32, intermediate_size=96,
                                moe_intermediate_size=48, num_experts=4, norm_topk_prob=True)
        model = Qwen3MoeForCausalLM(config)
    else:
        config = MixtralConfig(**common, intermediate_size=48, num_local_experts=4)
        model = MixtralForCausalLM(config)
    with torch.no_grad():  # larger router weights than the init's: clear top-k margins
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)  # non-trivial norm weights so a missed norm shows
    return model.eval()


def _topk_gap(router_logits, k):
    """The smallest gap between a token's k-th and (k+1)-th router logit, over all layers."""
    gaps = []
    for logits in router_logits:
        ranked = logits.float().sort(dim=-1, descending=True).values
        gaps.append((ranked[:, k - 1] - ranked[:, k]).min())
    return min(gaps).item()


def _convert(hf_model, tmp_path):
    from nemo_aot.conversion import hf_io, moe
    from nemo_aot.conversion.convert import build_single_model, single_process_world
    from nemo_aot.conversion.engine import check_source, expand, export, load_into

    hf_model.save_pretrained(tmp_path)
    hf = hf_io.read_json(str(tmp_path / "config.json"), "config")
    family, cfg = moe.model_config_from_hf(hf, "config.json")
    cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=8)
    files, weight_map = hf_io.weight_files(str(tmp_path))
    headers = hf_io.tensor_headers(files, weight_map)
    table = expand(moe.mappings(cfg, family), cfg.num_layers)
    check_source(table, {n: s for n, (s, _) in headers.items()}, moe.hf_shapes(cfg, family),
                 str(tmp_path))
    with single_process_world():
        model = build_single_model(cfg, torch.float32)
        load_into(table, hf_io.iter_tensors(files), dict(model.named_parameters()), cfg,
                  str(tmp_path))
        tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
        positions = torch.arange(24).expand(2, 24)
        with torch.no_grad():
            logits = model(tokens, positions, None)[..., :cfg.vocab_size]
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        exported = dict(export(table, state, cfg))
        config = moe.hf_config_from_model(cfg, family, "float32")
    return cfg, tokens, logits, exported, config


@pytest.fixture(scope="module", params=[("qwen3_moe", 0), ("mixtral", 0)], ids=lambda p: p[0])
def converted(request, tmp_path_factory):
    family, seed = request.param
    hf_model = _tiny(family, seed)
    cfg, tokens, logits, exported, config = _convert(hf_model, tmp_path_factory.mktemp(family))
    with torch.no_grad():
        out = hf_model(tokens, output_router_logits=True)
    return hf_model, cfg, out, logits, exported, config


@pytest.mark.xdist_group("conversion_moe")
def test_logits_equal_transformers(converted):
    hf_model, cfg, out, logits, _, _ = converted
    gap = _topk_gap(out.router_logits, cfg.moe_router_topk)
    assert gap > MIN_GAP, f"top-k tie within {gap:.2e}: pick another seed or input"
    diff = (logits - out.logits).abs().max().item()
    print(f"{hf_model.config.model_type}: max |logit diff| {diff:.2e}, min top-k gap {gap:.2e}")
    assert diff <= TOL


@pytest.mark.xdist_group("conversion_moe")
def test_round_trip_is_bitwise(converted):
    hf_model, _, _, _, exported, _ = converted
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        original = load_file(f"{d}/model.safetensors")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.xdist_group("conversion_moe")
def test_exported_config_loads_in_transformers(converted):
    hf_model, _, _, _, _, config = converted
    from transformers import AutoConfig

    loaded = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    for key, value in config.items():
        if key in ("architectures", "torch_dtype", "rope_scaling", "rope_theta", "use_cache"):
            continue
        assert getattr(hf_model.config, key) == value or getattr(loaded, key) == value, key


def test_refusals_name_the_field():
    from nemo_aot.conversion import moe

    base = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 128,
            "intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": 4,
            "num_experts_per_tok": 2}
    with pytest.raises(ValueError, match="mlp_only_layers"):
        moe.model_config_from_hf({**base, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        moe.model_config_from_hf({**base, "decoder_sparse_step": 2})
    _, cfg = moe.model_config_from_hf(base)
    shared = dataclasses.replace(cfg, moe_shared_expert_intermediate_size=32)
    with pytest.raises(ValueError, match="moe_shared_expert_intermediate_size"):
        moe.hf_config_from_model(shared, moe.QWEN3_MOE, "float32")
    # Mixtral and Qwen3.5-MoE always renormalize their top-k weights; Qwen3-MoE says so in a key
    plain = dataclasses.replace(cfg, moe_router_topk_normalize=False, qk_layernorm=False)
    with pytest.raises(ValueError, match="moe_router_topk_normalize.*Mixtral always renormalizes"):
        moe.MIXTRAL.export_fields(plain)
    gated = dataclasses.replace(plain, moe_shared_expert_intermediate_size=32,
                                moe_shared_expert_gate=True)
    with pytest.raises(ValueError, match="Qwen3.5-MoE always renormalizes its top-k weights"):
        moe.QWEN3_5_MOE.export_fields(gated)
    assert moe.QWEN3_MOE.export_fields(
        dataclasses.replace(cfg, moe_router_topk_normalize=False))["norm_topk_prob"] is False
