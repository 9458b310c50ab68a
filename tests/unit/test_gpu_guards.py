"""Start-up refusals and settings for what only a GPU run would show: FP8 combinations that
cannot be made right, FP8 recipes the GPU cannot run, and where weights are initialized."""

import pytest

from config_stubs import DEMO_WITHOUT_CHECKPOINT
from nemo_aot.algorithms.resolve import compose_config
from nemo_aot.models.options import FP8_RECIPES, check_fp8_device

FP8 = ["precision.precision=bf16", "precision.transformer_impl=transformer_engine",
       "precision.fp8=hybrid", "data.pad_to_multiple_of=16"]


@pytest.mark.parametrize("overrides, match", [
    ([*FP8, "alignment.sort_scope=global"], r"sort_scope=global with precision.fp8_recipe=delayed"),
    ([*FP8, "precision.fp8_param=true", "optim.use_distributed_optimizer=true",
      "alignment.reference_policy=cpu_swap"],
     r"fp8_param with alignment.reference_policy=cpu_swap"),
    ([*FP8, "alignment.reference_policy=cpu_swap", "alignment.sort_scope=micro"],
     r"cpu_swap with precision.fp8_recipe=delayed"),
])
def test_fp8_combinations_that_cannot_be_right_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose_config("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, *overrides])


def test_fp8_combinations_that_are_right_pass():
    compose_config("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, *FP8, "alignment.sort_scope=global",
                               "precision.fp8_recipe=tensorwise"])
    compose_config("gpt_aot", [*DEMO_WITHOUT_CHECKPOINT, *FP8, "alignment.sort_scope=micro"])


@pytest.mark.parametrize("recipe, capability, match", [
    ("mxfp8", (9, 0), r"mxfp8 needs compute capability >= 10.0; this GPU is 9.0: use "
                      r"precision.fp8_recipe=delayed or tensorwise or blockwise"),
    ("blockwise", (8, 9), r"blockwise needs compute capability >= 9.0; this GPU is 8.9"),
    ("delayed", (8, 0), r"this GPU is 8.0: set precision.fp8=null"),
])
def test_fp8_recipes_the_gpu_cannot_run_are_refused(recipe, capability, match):
    with pytest.raises(ValueError, match=match):
        check_fp8_device(recipe, capability)


def test_every_fp8_recipe_runs_on_blackwell():
    for recipe in FP8_RECIPES:
        check_fp8_device(recipe, (10, 0))


def test_weights_are_initialized_on_the_device_of_a_gpu_host(monkeypatch):
    """A GPU host initializes each rank's shard on the device, not the full master weight on
    every rank's CPU (minutes at 70B); without CUDA the CPU init keeps layouts identical."""
    import torch

    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.config import default_tiny, to_transformer_config

    assert to_transformer_config(default_tiny(), ParallelConfig()).use_cpu_initialization
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not to_transformer_config(default_tiny(), ParallelConfig()).use_cpu_initialization
