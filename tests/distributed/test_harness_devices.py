"""The multi-rank harness's device choice on a CPU machine: gloo and the CPU by default and for
``auto``, a clear refusal of ``cuda`` without GPUs or with fewer GPUs than ranks. (Its NCCL side
runs in tests/gpu/test_collectives_gpu.py.)"""

import os

import pytest
import torch
import torch.distributed as dist

import multirank
from multirank import rank_device, resolve_device, run_multirank


def _backend_and_device():
    return dist.get_backend(), str(rank_device()), torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU host's choice")
@pytest.mark.parametrize("device,world", [(None, 2), ("auto", 1)])
def test_cpu_host_runs_gloo_on_the_cpu(device, world):
    assert run_multirank(_backend_and_device, world, timeout=180, device=device) == \
        [("gloo", "cpu", False)] * world


def test_device_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("MULTIRANK_DEVICE", raising=False)
    assert resolve_device() == "cpu"
    monkeypatch.setenv("MULTIRANK_DEVICE", "cuda")
    assert resolve_device() == "cuda" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="must be one of"):
        resolve_device("gpu")


def test_cuda_is_refused_without_enough_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        run_multirank(_backend_and_device, 1, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        run_multirank(_backend_and_device, 2, device="cuda")


def test_environment_changes_for_spawning_are_undone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with multirank._environ({"CUDA_VISIBLE_DEVICES": "", "MULTIRANK_TEST_ONLY": "1"}):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ["MULTIRANK_TEST_ONLY"] == "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and "MULTIRANK_TEST_ONLY" not in os.environ
