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


def _reinitialize_layouts():
    import os

    from megatron.core import parallel_state as ps

    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    def threads():
        return len(os.listdir("/proc/self/task"))

    initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2))
    group, before = ps.get_data_parallel_group(), threads()
    for _ in range(3):  # what a process running many jobs in a row does
        initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2))
    same = ps.get_data_parallel_group() is group
    grown = threads() - before
    initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    return same, grown, ps.get_pipeline_model_parallel_world_size(), \
        ps.get_tensor_model_parallel_world_size()


def test_same_layout_reuses_groups_and_threads():
    # Before reuse, each call created ~50 threads of new gloo groups (a study worker running
    # 80 trainings in one process reached ~2200 threads).
    for same, grown, pp, tp in run_multirank(_reinitialize_layouts, 2, timeout=120):
        assert same and grown == 0
        assert (pp, tp) == (2, 1)  # a different layout still rebuilds the groups


def _rebuild_after_new_world():
    import os

    from megatron.core import parallel_state as ps

    from multirank import free_port
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    initialize_model_parallel(ParallelConfig())
    old = ps.get_data_parallel_group()
    torch.distributed.destroy_process_group()  # megatron's groups die with the world
    os.environ["MASTER_PORT"] = str(free_port())
    initialize_model_parallel(ParallelConfig())
    t = torch.ones(1)
    torch.distributed.all_reduce(t, group=ps.get_data_parallel_group())
    return ps.get_data_parallel_group() is not old, t.item()


def test_groups_are_rebuilt_in_a_new_default_group():
    assert run_multirank(_rebuild_after_new_world, 1, timeout=120) == [(True, 1.0)]
