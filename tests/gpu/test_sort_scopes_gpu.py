"""Every sort scope on the GPU (NCCL, bf16) equals the CPU fp32 reference within bf16 tolerance.

One step of unpaired AOT per scope (micro, data_parallel, global) on a tiny GPTModel whose
weights bf16 holds exactly, on the same micro-batches: once on the CPU over gloo in fp32 (the
reference), once on the GPU in fp32 and in bf16. fp32 on the GPU must match the reference
closely (a device bug would show there); bf16 within what bf16 compute costs. Worlds of 1, and
of 2 where two GPUs exist (then data_parallel gathers over NCCL). Run: ``pytest -m gpu tests/gpu``.
"""

import pytest
import torch

import gpu_cases as cases
from multirank import run_multirank

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORLDS = [1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                      reason="needs 2 GPUs"))]
_runs: dict = {}


def runs(world: int, device: str) -> list[dict]:
    """Per rank: {(precision, scope): metrics and grads}, computed once per world and device."""
    if (world, device) not in _runs:
        precisions = ("fp32",) if device == "cpu" else ("fp32", "bf16")
        _runs[world, device] = run_multirank(cases.scope_runs, world, args=(precisions,),
                                             timeout=300, device=device)
    return _runs[world, device]


def cpu_reference_possible():
    """The CPU reference needs nemo_aot's CPU execution support, which runs only on the
    megatron-core versions it was run with (make test-compat)."""
    from nemo_aot.distributed.cpu_support import SUPPORTED_MEGATRON_CORE, megatron_core_version

    version = megatron_core_version()
    if version[:2] not in SUPPORTED_MEGATRON_CORE:
        pytest.skip(f"megatron-core {version}: no CPU reference (CPU execution support is for "
                    f"{SUPPORTED_MEGATRON_CORE}); the GPU-only comparison covers this version")


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_and_fp32_on_gpu_match_the_cpu_fp32_reference(world):
    cpu_reference_possible()
    cpu, gpu = runs(world, "cpu"), runs(world, "cuda")
    for rank in range(world):
        cases.check_scopes_differ(gpu[rank], world)
        for scope in cases.SCOPES:
            ref = cpu[rank]["fp32", scope]
            cases.check_scope(gpu[rank]["fp32", scope], ref, loss_tol=1e-5, metric_tol=1e-4,
                              grad_tol=1e-4)
            cases.check_scope(gpu[rank]["bf16", scope], ref, loss_tol=2e-2, metric_tol=5e-2,
                              grad_tol=5e-2)


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_on_gpu_matches_fp32_on_gpu(world):
    """The same comparison without the CPU (whose execution support checks the megatron-core
    version): bf16 against fp32 on the GPU itself."""
    gpu = runs(world, "cuda")
    for rank in range(world):
        cases.check_scopes_differ(gpu[rank], world)
        for scope in cases.SCOPES:
            cases.check_scope(gpu[rank]["bf16", scope], gpu[rank]["fp32", scope], loss_tol=2e-2,
                              metric_tol=5e-2, grad_tol=5e-2)
