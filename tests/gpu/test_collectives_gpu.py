"""NCCL on the GPU: the multi-rank harness itself, and the autograd all-gather of the sort scopes
(uneven and empty inputs, several tensors in one call, bf16). Worlds of 1, and 2 where two GPUs
exist. Run: ``pytest -m gpu tests/gpu``."""

import pytest
import torch
import torch.distributed as dist

import gpu_cases as cases
from multirank import rank_device, run_multirank

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORLDS = [1, pytest.param(2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2,
                                                      reason="needs 2 GPUs"))]


def _where_am_i():
    t = torch.ones(2, device=rank_device()) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return {"backend": dist.get_backend(), "device": str(rank_device()),
            "current": torch.cuda.current_device(), "sum": t}


def _cpu_rank_sees_no_gpu():
    return dist.get_backend(), torch.cuda.is_available(), str(rank_device())


@pytest.mark.parametrize("world", WORLDS)
def test_cuda_ranks_join_nccl_on_their_own_gpu(world):
    results = run_multirank(_where_am_i, world, timeout=120, device="cuda")
    for rank, res in enumerate(results):
        assert res["backend"] == "nccl"
        assert res["device"] == f"cuda:{rank}" and res["current"] == rank
        assert res["sum"].device.type == "cpu"  # CUDA results come back on the host
        torch.testing.assert_close(res["sum"], torch.full((2,), world * (world + 1) / 2))


def test_cpu_ranks_on_a_gpu_host_use_gloo_without_the_gpu():
    assert run_multirank(_cpu_rank_sees_no_gpu, 1, timeout=120, device="cpu") == [
        ("gloo", False, "cpu")]


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_with_grad_on_the_gpu(world):
    cases.check_gather(run_multirank(cases.gather_case, world, timeout=120, device="cuda"), "cuda")
