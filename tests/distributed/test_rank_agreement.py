"""Decisions that change control flow come out the same on every rank, even when the ranks'
own views disagree: their clocks (the time budget) and their view of the filesystem (a
reference cache one rank sees and another does not). A rank deciding alone leaves the others
waiting in a collective it never enters: under NCCL a 30-minute hang, here a failed or timed-out
multi-rank run."""

import os
import sys

import pytest
import torch

from multirank import run_multirank

TIMEOUT = 120


def _trainer_with_skewed_clocks():
    """Rank 1's clock (started before unequal set-up work) passes the budget after its first
    step; rank 0's never does."""
    import time

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "unit"))
    from test_trainer_loop import _trainer

    trainer, saves, _ = _trainer([0.5] * 10, [1.0] * 10, max_steps=10, val_check_interval=0,
                                 max_time_minutes=1.0)
    if torch.distributed.get_rank() == 1:
        clock = iter([time.monotonic(), time.monotonic() + 61.0])  # at the start, after step 1
        trainer.started = time.monotonic()
        original = time.monotonic
        time.monotonic = lambda: next(clock, original() + 61.0)
    trainer.fit()
    return trainer.state.step, trainer.stop_reason, saves


def test_ranks_whose_clocks_disagree_stop_after_the_same_step():
    results = run_multirank(_trainer_with_skewed_clocks, world_size=2, timeout=TIMEOUT)
    assert results[0] == results[1] == (1, "max_time", [1])


class _FakeScorer:
    """Scores every response as -(sample index), on whichever ranks call it (DP = 2)."""

    def __init__(self):
        self.calls = 0

    def score(self, micro_batches):
        self.calls += 1
        rows = []
        for mb in micro_batches:
            index = mb["sample_index"]
            rows.append((mb["label"], index, -index.double(), torch.ones(len(index))))
        return rows


def _micro_batches(rank, n=4):
    """Global batches of 2 pairs per rank: chosen and rejected rows of samples on this rank."""
    batches = []
    for start in range(0, n, 2):
        index = torch.tensor([start + rank * n, start + 1 + rank * n] * 2)
        label = torch.tensor([True, True, False, False])
        batches.append([{"sample_index": index, "label": label}])
    return batches


def _cache_seen_by_one_rank(which: int, root: str):
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.reference import ReferenceTable, cached_reference

    initialize_model_parallel(ParallelConfig())
    rank = torch.distributed.get_rank()
    sizes = (8, 8)
    # Node-local output folders: each rank has its own; only `which` holds a (valid) cache.
    path = os.path.join(root, f"rank{rank}", "train.pt")
    if rank == which:
        os.makedirs(os.path.dirname(path))
        table = ReferenceTable(sizes)
        for side in (0, 1):
            table.logp[side] = torch.full((8,), 7.0, dtype=torch.float64)
            table.count[side] = torch.ones(8, dtype=torch.float64)
        torch.save(table.state(), path)
    scorer = _FakeScorer()
    table = cached_reference(scorer, _micro_batches(rank), sizes, path, total=2)
    return scorer.calls, table.logp[0].tolist()


@pytest.mark.parametrize("which", [0, 1])
def test_a_reference_cache_one_rank_sees_does_not_split_the_ranks(which, tmp_path):
    """Rank 0 decides for all: its cache is reused everywhere; a cache only rank 1 sees is
    ignored, and every rank scores together."""
    results = run_multirank(_cache_seen_by_one_rank, world_size=2, args=(which, str(tmp_path)),
                            timeout=TIMEOUT)
    if which == 0:
        assert results == [(0, [7.0] * 8)] * 2
    else:
        assert results == [(2, [-float(i) for i in range(8)])] * 2
        assert os.path.exists(tmp_path / "rank0" / "train.pt")  # rank 0 wrote its own


def _scoring_interrupted_on_one_rank():
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.distributed.ranks import StopRequested
    from nemo_aot.models.reference import score_into_table

    initialize_model_parallel(ParallelConfig())
    rank = torch.distributed.get_rank()
    scorer = _FakeScorer()
    try:  # a signal reached rank 1 only, after the first global batch
        score_into_table(scorer, _micro_batches(rank, n=8), (16, 16), total=4,
                         stop_requested=lambda: rank == 1 and scorer.calls >= 1)
    except StopRequested as stop:
        return scorer.calls, str(stop)
    return scorer.calls, None


def test_a_stop_during_scoring_reaches_every_rank_at_the_same_batch():
    results = run_multirank(_scoring_interrupted_on_one_rank, world_size=2, timeout=TIMEOUT)
    assert results == [(1, "reference scoring")] * 2


def _agreement_helpers():
    from nemo_aot.distributed.ranks import any_ranks, from_rank0

    rank = torch.distributed.get_rank()
    return any_ranks([rank == 1, False, True]), from_rank0({"rank": rank})


def test_agreement_helpers():
    results = run_multirank(_agreement_helpers, world_size=2, timeout=TIMEOUT)
    assert results == [((True, False, True), {"rank": 0})] * 2
    from nemo_aot.distributed.ranks import any_ranks, from_rank0

    assert any_ranks([True, False]) == (True, False) and from_rank0(3) == 3  # no process group


