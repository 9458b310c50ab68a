"""The performance section: every refusal names its key, the fusions follow the host's kernels
(auto on where present and worthwhile, forced on only where possible, always off on request),
and the start-up line says what is on and why the rest is off."""

import logging

import pytest

from config_stubs import DEMO_WITHOUT_CHECKPOINT
from nemo_aot.algorithms.resolve import compose_config
from nemo_aot.models import performance
from nemo_aot.models.performance import (
    FUSIONS,
    Kernel,
    PerformanceConfig,
    describe_fusions,
    resolve_fusions,
    transformer_overrides,
)

FULL = ["performance.recompute_granularity=full", "performance.recompute_method=uniform"]
DIST_OPT = "optim.use_distributed_optimizer=true"


def compose(*overrides, world_size=None):
    return compose_config("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, *overrides],
                          world_size=world_size)


@pytest.mark.parametrize("overrides, match", [
    (["performance.recompute_granularity=partial"], r"performance\.recompute_granularity must"),
    (["performance.recompute_method=uniform"],
     r"performance\.recompute_granularity is null"),
    (["performance.recompute_granularity=selective", "performance.recompute_num_layers=1"],
     r"recompute_granularity=full only"),
    (["performance.recompute_granularity=selective", "performance.recompute_modules=[attn]"],
     r"performance\.recompute_modules must"),
    (["performance.recompute_granularity=selective", "performance.recompute_modules=[]"],
     r"performance\.recompute_modules must"),
    (["performance.recompute_granularity=full", "performance.recompute_num_layers=1"],
     r"performance\.recompute_method uniform or block"),
    (FULL, r"performance\.recompute_num_layers, a positive integer"),
    ([*FULL, "performance.recompute_num_layers=0"], r"performance\.recompute_num_layers"),
    # the demo model has 2 layers
    ([*FULL, "performance.recompute_num_layers=3"],
     r"performance\.recompute_num_layers=3 exceeds the 2 layers"),
    (["model.num_layers=3", *FULL, "performance.recompute_num_layers=2"],
     r"performance\.recompute_method=uniform needs recompute_num_layers to divide"),
    (["performance.overlap_grad_reduce=true", "performance.ddp_bucket_size=0"],
     r"performance\.ddp_bucket_size must be an integer >= 1"),
    (["performance.ddp_bucket_size=1000"], r"performance\.ddp_bucket_size only applies"),
    (["performance.overlap_grad_reduce=true", "performance.overlap_param_gather=true"],
     r"overlap_param_gather needs optim\.use_distributed_optimizer=true"),
    ([DIST_OPT, "performance.overlap_param_gather=true"],
     r"overlap_param_gather needs performance\.overlap_grad_reduce=true"),
    (["performance.align_param_gather=true"],
     r"align_param_gather needs performance\.overlap_param_gather=true"),
    ([DIST_OPT, "performance.overlap_grad_reduce=true", "performance.overlap_param_gather=true",
      "performance.align_param_gather=true"],
     r"performance\.align_param_gather applies to the interleaved pipeline schedule"),
    (["precision.precision=bf16", "precision.transformer_impl=transformer_engine",
      "precision.fp8=hybrid", "data.pad_to_multiple_of=16",
      "performance.recompute_granularity=selective",
      "performance.recompute_modules=[core_attn,layernorm]"],
     r"performance\.recompute_modules=\[layernorm\] does not work with FP8 delayed"),
])
def test_refusals_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose(*overrides)


def test_a_fusion_is_true_false_or_null():
    with pytest.raises(ValueError, match=r"performance\.apply_rope_fusion"):
        compose("performance.apply_rope_fusion=maybe")
    with pytest.raises(ValueError, match=r"performance\.masked_softmax_fusion must be true"):
        PerformanceConfig(masked_softmax_fusion="on").validate()


def test_valid_settings_compose():
    cfg = compose(*FULL, "performance.recompute_num_layers=1").performance
    assert cfg.recompute_kwargs() == dict(recompute_granularity="full", recompute_method="uniform",
                                          recompute_num_layers=1)
    cfg = compose("performance.recompute_granularity=selective",
                  "performance.recompute_modules=[core_attn,mlp]").performance
    assert cfg.recompute_kwargs() == dict(recompute_granularity="selective",
                                          recompute_modules=["core_attn", "mlp"])
    assert PerformanceConfig().recompute_kwargs() == {}
    cfg = compose(DIST_OPT, "performance.overlap_grad_reduce=true",
                  "performance.overlap_param_gather=true", "performance.ddp_bucket_size=4000",
                  "parallel.pipeline_model_parallel_size=2",
                  "parallel.virtual_pipeline_model_parallel_size=2", "model.num_layers=4",
                  "data.uniform_step_length=true",
                  "performance.align_param_gather=true").performance
    assert cfg.ddp_kwargs(use_distributed_optimizer=True) == dict(
        overlap_grad_reduce=True, overlap_param_gather=True, align_param_gather=True,
        bucket_size=4000)


def test_layernorm_recompute_needs_transformer_engine(monkeypatch):
    cfg = PerformanceConfig(recompute_granularity="selective",
                            recompute_modules=["core_attn", "layernorm"])
    monkeypatch.setattr(performance.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"performance\.recompute_modules=\[layernorm\] needs "
                                         "TransformerEngine"):
        cfg.check_runtime()


def _host(**kernels):
    """KERNEL_PROBES of a pretend host: name -> Kernel (unlisted fusions: absent)."""
    absent = Kernel(False, False, "absent here")

    def probe(name):
        kernel = kernels.get(name, absent)
        return lambda transformer_impl, attention_backend: kernel

    return {name: probe(name) for name in FUSIONS}


def test_auto_turns_on_what_is_present_and_pays(monkeypatch):
    monkeypatch.setattr(performance, "KERNEL_PROBES", _host(
        apply_rope_fusion=Kernel(True, True, "TE's fused RoPE"),
        bias_activation_fusion=Kernel(True, False, "no GPU")))
    plan = resolve_fusions(PerformanceConfig(), "local", "sdpa")
    assert {k: on for k, (on, _) in plan.items()} == {
        "bias_activation_fusion": False, "apply_rope_fusion": True,
        "masked_softmax_fusion": False, "gradient_accumulation_fusion": False}
    line = describe_fusions(plan)
    assert line.startswith("fused kernels: on: apply_rope_fusion (TE's fused RoPE) | off: ")
    assert "bias_activation_fusion (no GPU)" in line
    assert "masked_softmax_fusion (absent here)" in line


def test_a_user_forces_each_fusion_on_or_off(monkeypatch):
    monkeypatch.setattr(performance, "KERNEL_PROBES", _host(
        apply_rope_fusion=Kernel(True, True, "TE's fused RoPE"),
        bias_activation_fusion=Kernel(True, False, "no GPU")))
    plan = resolve_fusions(PerformanceConfig(apply_rope_fusion=False, bias_activation_fusion=True),
                           "local", "sdpa")
    assert plan["apply_rope_fusion"] == (False, "performance.apply_rope_fusion=false")
    assert plan["bias_activation_fusion"] == (True, "performance.bias_activation_fusion=true")
    for name in ("masked_softmax_fusion", "gradient_accumulation_fusion"):
        with pytest.raises(ValueError, match=rf"performance\.{name}=true, but it cannot run "
                                             rf"here: absent here\. Set performance\.{name}=null"):
            resolve_fusions(PerformanceConfig(**{name: True}), "local", "sdpa")


def test_this_host_says_why_each_fusion_is_off():
    """On a CPU-only host nothing is on by default, and each fusion has its own reason."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CPU-only host's defaults")
    plan = resolve_fusions(PerformanceConfig(), "local", "unfused")
    assert all(not on and why for on, why in plan.values()), plan
    assert len({why for _, why in plan.values()}) == len(FUSIONS)


def test_the_start_up_line_and_the_transformer_fields(monkeypatch, caplog):
    monkeypatch.setattr(performance, "KERNEL_PROBES", _host(
        masked_softmax_fusion=Kernel(True, True, "apex's softmax")))
    perf = PerformanceConfig(recompute_granularity="full", recompute_method="block",
                             recompute_num_layers=1, gradient_accumulation_fusion=False)
    with caplog.at_level(logging.INFO, logger=performance.__name__):
        fields = transformer_overrides(perf, "local", "unfused")
    assert fields == dict(recompute_granularity="full", recompute_method="block",
                          recompute_num_layers=1, bias_activation_fusion=False,
                          apply_rope_fusion=False, masked_softmax_fusion=True,
                          gradient_accumulation_fusion=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fused kernels")]
    assert lines == ["fused kernels: on: masked_softmax_fusion (apex's softmax) | off: "
                     "bias_activation_fusion (absent here); apply_rope_fusion (absent here); "
                     "gradient_accumulation_fusion (performance.gradient_accumulation_fusion="
                     "false)"]
