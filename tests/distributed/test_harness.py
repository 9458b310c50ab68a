import pytest
import torch
import torch.distributed as dist

from multirank import run_multirank


def _sum_ranks():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    return 0


def _hang():
    if dist.get_rank() == 0:
        import time
        time.sleep(60)
    return 0


def test_results_come_back_in_rank_order():
    assert run_multirank(_sum_ranks, 2, timeout=60) == [(0, 3.0), (1, 3.0)]


def test_rank_failure_surfaces_traceback():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_multirank(_fail_on_rank1, 2, timeout=60)


def test_hung_rank_is_killed_and_reported():
    with pytest.raises(RuntimeError, match="timed out"):
        run_multirank(_hang, 2, timeout=8)
