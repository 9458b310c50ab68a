"""LoRA on one process: bad `peft` configs fail at start-up naming the key; the TE-shaped layer
returns are handled (TransformerEngine itself is absent here); the Hugging Face PEFT layout
round-trips megatron's fused adapters exactly."""

from types import SimpleNamespace

import pytest
import torch

from config_stubs import DEMO_WITHOUT_CHECKPOINT
from nemo_aot.algorithms.resolve import compose_config
from nemo_aot.models.config import default_tiny


def compose(*overrides):
    return compose_config("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, *overrides])


def test_peft_lora_composes_with_the_adapters_off_reference():
    cfg = compose("peft=lora", "peft.rank=8")
    assert cfg.peft.enabled and cfg.peft.rank == 8 and cfg.peft.alpha == 32
    assert cfg.alignment.reference_policy == "adapters_off"
    assert cfg.peft.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert not compose().peft.enabled  # full fine-tuning by default
    assert compose("peft=lora", "alignment.reference_policy=cached").alignment.reference_policy \
        == "cached"


@pytest.mark.parametrize("overrides, key", [
    (["peft=lora", "peft.rank=0"], "peft.rank"),
    (["peft=lora", "peft.rank=-4"], "peft.rank"),
    (["peft=lora", "peft.alpha=0"], "peft.alpha"),
    (["peft=lora", "peft.dropout=1.0"], "peft.dropout"),
    (["peft=lora", "peft.target_modules=[linear_qkv,q_proj]"], "peft.target_modules"),
    (["peft=lora", "peft.target_modules=[]"], "peft.target_modules"),
    (["peft=lora", "peft.scheme=qlora"], "peft.scheme"),
    (["peft=lora", "alignment.reference_policy=cpu_swap"], "alignment.reference_policy=cpu_swap"),
    (["alignment.reference_policy=adapters_off"], "adapters_off needs LoRA adapters"),
    (["peft=lora", "peft.dropout=0.1", "alignment.sort_scope=global"], "peft.dropout"),
    (["peft.adapter_from=somewhere"], "peft.adapter_from"),
    (["peft=lora", "peft.adapter_from=somewhere"], "peft.adapter_from needs init_from"),
])
def test_bad_peft_configs_fail_at_start_up_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[")):
        compose(*overrides)


def test_transformer_engine_with_lora_is_configured_and_refused_without_te():
    pytest.importorskip("megatron.core")
    cfg = compose("peft=lora", "precision.transformer_impl=transformer_engine")
    assert cfg.peft.enabled and cfg.precision.transformer_impl == "transformer_engine"
    with pytest.raises(ValueError, match="precision.fp8_param with peft.scheme=lora"):
        compose("peft=lora", "precision.transformer_impl=transformer_engine",
                "precision.precision=bf16", "precision.fp8=e4m3", "precision.fp8_param=true",
                "optim.use_distributed_optimizer=true", "data.pad_to_multiple_of=16")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="TransformerEngine"):
            cfg.precision.check_runtime()


class _OneRankGroup:
    def size(self):
        return 1

    def rank(self):
        return 0


class _FakeTENormLinear(torch.nn.Module):
    """What matters of TE's LayerNormColumnParallelLinear (as megatron wraps it): a norm fused
    into the linear, whose normalized input comes back when ``return_layernorm_output`` is set,
    as ((out, ln_out), None), or as (out, bias, ln_out) when the bias is returned apart."""

    def __init__(self, return_bias=False):
        super().__init__()
        self.config = SimpleNamespace(sequence_parallel=False, gated_linear_unit=True,
                                      params_dtype=torch.float32)
        self.tp_group = _OneRankGroup()
        self.weight = torch.nn.Parameter(torch.randn(12, 6))
        self.bias = torch.nn.Parameter(torch.randn(12))
        self.return_layernorm_output = False
        self.return_bias = return_bias

    def forward(self, x):
        ln = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        out = torch.nn.functional.linear(ln, self.weight)
        if self.return_bias:
            return (out, self.bias, ln) if self.return_layernorm_output else (out, self.bias)
        out = out + self.bias
        return ((out, ln), None) if self.return_layernorm_output else (out, None)


@pytest.mark.parametrize("return_bias", [False, True])
def test_norm_fused_layers_feed_the_normalized_input_to_the_adapter(return_bias):
    from nemo_aot.models.lora import LoRAOptions, lora_class

    torch.manual_seed(0)
    options = LoRAOptions(rank=2, alpha=4.0, dropout=0.0)
    layer = lora_class(_FakeTENormLinear, "linear_qkv", options)(return_bias=return_bias)
    assert isinstance(layer, _FakeTENormLinear) and layer.return_layernorm_output
    with torch.no_grad():
        layer.adapter.linear_out.weight.normal_()
    x = torch.randn(5, 3, 6)
    out, bias = layer(x)
    ln = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    base = torch.nn.functional.linear(ln, layer.weight)
    delta = layer.adapter.delta()
    torch.testing.assert_close(delta, 2.0 * layer.adapter.linear_out.weight
                               @ layer.adapter.linear_in.weight)
    expected = base + torch.nn.functional.linear(ln, delta)
    if return_bias:
        assert bias is layer.bias
    else:
        assert bias is None
        expected = expected + layer.bias
    torch.testing.assert_close(out, expected)
    layer.adapter.enabled = False
    torch.testing.assert_close(layer(x)[0], expected - torch.nn.functional.linear(ln, delta))


def test_peft_layout_round_trips_the_fused_adapters(tmp_path):
    from nemo_aot.conversion.peft_adapter import (
        adapter_config,
        read_peft_adapter,
        write_peft_adapter,
    )

    cfg, r = default_tiny(), 3  # 4 heads in 2 KV groups of 16: qkv rows 128; ffn 176
    g = torch.Generator().manual_seed(0)
    shapes = {"linear_qkv": (64, 128), "linear_proj": (64, 64), "linear_fc1": (64, 352),
              "linear_fc2": (176, 64)}
    adapters = {(i, t): (torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g))
                for i in range(cfg.num_layers) for t, (n_in, n_out) in shapes.items()}
    targets = list(shapes)
    write_peft_adapter(str(tmp_path / "a"), adapters, cfg, adapter_config(r, 6.0, 0.0, targets))
    back = read_peft_adapter(str(tmp_path / "a"), cfg, r, 6.0, targets)
    assert back.keys() == adapters.keys()
    for key, (a, b) in adapters.items():
        assert torch.equal(back[key][0], a) and torch.equal(back[key][1], b), key
    with pytest.raises(ValueError, match="peft.rank=3"):
        read_peft_adapter(str(tmp_path / "a"), cfg, 4, 6.0, targets)
    with pytest.raises(ValueError, match="target_modules"):
        read_peft_adapter(str(tmp_path / "a"), cfg, r, 6.0, ["linear_qkv"])
