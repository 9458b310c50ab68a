"""Parallel layout validation, precision options and the CPU-support guard rails."""

import pytest
import torch

from nemo_aot.distributed.parallel import ParallelConfig
from nemo_aot.losses.config import AlignmentConfig
from nemo_aot.models.config import GPTModelConfig, default_tiny
from nemo_aot.models.options import PrecisionConfig

MODEL = GPTModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2)


@pytest.mark.parametrize("cfg, world, match", [
    (ParallelConfig(2, 2), 6, "not divisible"),
    (ParallelConfig(3, 1), 3, "num_attention_heads"),
    (ParallelConfig(4, 1), 4, "num_query_groups"),
    (ParallelConfig(1, 3), 3, "num_layers"),
    (ParallelConfig(1, 2, 4), 2, "num_layers"),
    (ParallelConfig(1, 1, 2), 1, "pipeline_model_parallel_size >= 2"),
    (ParallelConfig(1, 2, 1), 2, "must be >= 2"),
    (ParallelConfig(1, 1, None, True), 1, "sequence_parallel"),
    (ParallelConfig(0, 1), 1, "positive integer"),
])
def test_impossible_layouts_are_refused_naming_the_key(cfg, world, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate(world, MODEL)


@pytest.mark.parametrize("cfg, world", [(ParallelConfig(2, 2), 8), (ParallelConfig(1, 2, 2), 2),
                                        (ParallelConfig(2, 1, None, True), 2)])
def test_possible_layouts_pass(cfg, world):
    cfg.validate(world, MODEL)
    assert cfg.data_parallel_size(world) == world // (cfg.tensor_model_parallel_size
                                                      * cfg.pipeline_model_parallel_size)


@pytest.mark.parametrize("changes, key", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_query_groups=3), "num_query_groups"),
    (dict(normalization="LayerNorm"), "normalization"),
    (dict(attention_backend="flash"), "attention_backend"),
    (dict(encoder_seq_length=1024), "encoder_seq_length"),
])
def test_model_config_validation(changes, key):
    import dataclasses

    with pytest.raises(ValueError, match=key):
        dataclasses.replace(default_tiny(), **changes).validate()


def test_model_config_round_trips_and_rejects_unknown_keys():
    cfg = default_tiny()
    assert GPTModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys.*hiden_size"):
        GPTModelConfig.from_dict({**cfg.to_dict(), "hiden_size": 3})


def test_padded_vocab_is_a_multiple_of_divisor_times_tp():
    cfg = GPTModelConfig(vocab_size=1000, make_vocab_size_divisible_by=128)
    assert cfg.padded_vocab_size(1) == 1024 and cfg.padded_vocab_size(8) == 1024
    assert cfg.padded_vocab_size(3) == 1152


@pytest.mark.parametrize("changes, match", [
    (dict(fp8="e4m3"), "transformer_impl=transformer_engine"),
    (dict(fp8="e5m2"), "fp8 must be one of"),
    (dict(fp8_param=True), "fp8_param needs"),
    (dict(transformer_impl="te"), "transformer_impl"),
    (dict(fp8="hybrid", transformer_impl="transformer_engine", precision="fp32"), "bf16 or fp16"),
])
def test_precision_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        PrecisionConfig(**changes).validate()


def test_fp8_without_te_or_gpu_is_a_start_up_error():
    cfg = PrecisionConfig(fp8="hybrid", transformer_impl="transformer_engine")
    cfg.validate()
    try:
        import transformer_engine  # noqa: F401
        has_te = True
    except ImportError:
        has_te = False
    if has_te and torch.cuda.is_available():
        pytest.skip("TE and a GPU are present: covered by tests/gpu")
    with pytest.raises(ValueError, match="TransformerEngine|CUDA GPU"):
        cfg.check_runtime()


def test_alignment_validation_names_the_key():
    with pytest.raises(ValueError, match="alignment.sort_scope"):
        AlignmentConfig(sort_scope="node").validate()
    with pytest.raises(ValueError, match="alignment: beta"):
        AlignmentConfig(beta=0.0).validate()


def test_cpu_support_refuses_unknown_megatron_versions(monkeypatch):
    from nemo_aot.distributed import cpu_support

    if torch.cuda.is_available():
        pytest.skip("CPU support is never active with CUDA")
    monkeypatch.setattr(cpu_support, "_ENABLED", False)
    monkeypatch.delenv(cpu_support.ALLOW_UNTESTED_ENV, raising=False)
    for version in ((0, 9, 0), (0, 15, 2), (0, 20, 0)):
        monkeypatch.setattr(cpu_support, "megatron_core_version", lambda v=version: v)
        found = ".".join(map(str, version)).replace(".", r"\.")
        env = cpu_support.ALLOW_UNTESTED_ENV
        with pytest.raises(RuntimeError, match=rf"run with megatron-core 0\.16\.x - 0\.19\.x, "
                                               rf"found {found}.*{env}=1"):
            cpu_support.enable_cpu_execution()


def test_untested_megatron_is_tried_when_asked_and_warned_about_on_gpu(monkeypatch, caplog):
    from nemo_aot.distributed import cpu_support

    monkeypatch.setattr(cpu_support, "megatron_core_version", lambda: (0, 20, 1))
    monkeypatch.setenv(cpu_support.ALLOW_UNTESTED_ENV, "1")
    with caplog.at_level("WARNING", logger=cpu_support.__name__):
        assert cpu_support.check_megatron_core(on_cpu=True) == (0, 20, 1)
    assert "0.20.1 is outside the range nemo_aot was run with (0.16.x - 0.19.x)" in caplog.text
    monkeypatch.delenv(cpu_support.ALLOW_UNTESTED_ENV)
    caplog.clear()
    with caplog.at_level("WARNING", logger=cpu_support.__name__):
        assert cpu_support.check_megatron_core(on_cpu=False) == (0, 20, 1)  # GPU: proceeds
    assert "proceeding" in caplog.text
    monkeypatch.setattr(cpu_support, "megatron_core_version", lambda: (0, 17, 0))
    caplog.clear()
    assert cpu_support.check_megatron_core(on_cpu=True) == (0, 17, 0)
    assert not caplog.text
