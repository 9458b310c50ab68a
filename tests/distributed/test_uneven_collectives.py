"""The uneven all-gather and reduce-scatter that gloo lacks, as the CPU execution support
emulates them for megatron's all-to-all token dispatcher under expert tensor parallelism:
checked against the collectives' definitions, through megatron's own autograd mappings."""

import pytest
import torch

from multirank import run_multirank

SIZES = [3, 1, 0]  # rows per rank: unequal, one rank empty


def _rows(rank):
    return torch.arange(SIZES[rank] * 2, dtype=torch.float32).view(-1, 2) + 100 * rank


def _check():
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from nemo_aot.distributed.cpu_support import enable_cpu_execution

    enable_cpu_execution()
    rank, group = dist.get_rank(), dist.group.WORLD
    mine = _rows(rank).requires_grad_(True)
    gathered = mappings.gather_from_sequence_parallel_region(
        mine, tensor_parallel_output_grad=True, group=group, output_split_sizes=SIZES)
    expected = torch.cat([_rows(r) for r in range(len(SIZES))])
    assert torch.equal(gathered.detach(), expected)
    # backward = the uneven reduce-scatter: each rank's rows of the sum over ranks of the
    # incoming gradients (rank r sends (r + 1) * ones)
    gathered.backward(torch.ones_like(gathered) * (rank + 1))
    total = sum(r + 1 for r in range(len(SIZES)))
    assert torch.equal(mine.grad, torch.full_like(mine, float(total)))
    full = torch.arange(sum(SIZES) * 2, dtype=torch.float32).view(-1, 2) * (rank + 1)
    scattered = mappings.reduce_scatter_to_sequence_parallel_region(
        full, group=group, input_split_sizes=SIZES)
    start = sum(SIZES[:rank])
    base = torch.arange(sum(SIZES) * 2, dtype=torch.float32).view(-1, 2)[start:start + SIZES[rank]]
    assert torch.equal(scattered, base * total)
    return True


@pytest.mark.slow
def test_uneven_gather_and_reduce_scatter_on_gloo():
    assert run_multirank(_check, 3, timeout=240) == [True] * 3
