"""Training state on the GPU: a checkpoint round trip into a fresh process (model, optimizer,
RNG bundle with the CUDA generators and megatron's tracker) and the ``cpu_swap`` reference
policy (weights held in host memory, swapped in to score). Run: ``pytest -m gpu tests/gpu``."""

import pytest
import torch

import gpu_cases as cases
from multirank import run_multirank

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_checkpoint_round_trip_resumes_the_same_step(tmp_path):
    root = str(tmp_path / "ckpt")
    (saved,) = run_multirank(cases.checkpoint_case, 1, args=(root, "save"), timeout=300,
                             device="cuda")
    (resumed,) = run_multirank(cases.checkpoint_case, 1, args=(root, "resume"), timeout=300,
                               device="cuda")
    cases.check_checkpoint(saved, resumed)


def test_cpu_swap_scores_with_the_reference_and_restores_the_policy():
    (res,) = run_multirank(cases.cpu_swap_case, 1, timeout=300, device="cuda")
    cases.check_cpu_swap(res, "cuda:0")
