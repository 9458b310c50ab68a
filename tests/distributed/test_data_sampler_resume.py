"""Resume in fresh processes: k steps, save the state, restore elsewhere -> the uninterrupted
batches.

The uninterrupted run needs no process group (DP rank and size are plain ints, as the trainer
passes megatron's), so it runs here for every rank; the resumed run happens in fresh gloo ranks
that read their rank from torch.distributed. Paired and unpaired data both cross epochs.
"""

import copy

import pytest
import torch.distributed as dist

from multirank import run_multirank
from nemo_aot.data import DataConfig, make_batches
from nemo_aot.data.synthetic import synthetic_preference_data

# kind -> (stream sizes, global batch, micro batch); 5 and 4 steps per epoch at both DP sizes.
SETUPS = {"paired": ((23,), 4, 2), "unpaired": ((9, 27), 8, 4)}
BEFORE, AFTER = 7, 6


def _batches(kind: str, dp_rank: int, dp_size: int):
    sizes, gbs, mbs = SETUPS[kind]
    data = synthetic_preference_data(kind, sizes, seed=11)
    cfg = DataConfig(seed=5, pad_to_multiple_of=4)
    return make_batches(data, cfg, gbs, mbs, dp_rank=dp_rank, dp_size=dp_size)


def _take(batches, n):
    out = []
    while len(out) < n:
        for step in batches:
            out.append([{k: m[k].tolist()
                         for k in ("input_ids", "loss_mask", "sample_index", "label")}
                        for m in step])
            if len(out) == n:
                break
    return out


def _uninterrupted(dp_rank: int, dp_size: int):
    result = {}
    for kind in SETUPS:
        batches = _batches(kind, dp_rank, dp_size)
        first = _take(batches, BEFORE)
        state = copy.deepcopy(batches.state_dict())
        result[kind] = (first + _take(batches, AFTER), state)
    return result


def _resumed(states):
    result = {}
    for kind, state in states.items():
        # A fresh process: nothing carried over but the saved state.
        batches = _batches(kind, dist.get_rank(), dist.get_world_size())
        batches.load_state_dict(state)
        result[kind] = _take(batches, AFTER)
    return result


@pytest.mark.parametrize("dp", [1, 2])
def test_resume_in_fresh_processes_continues_exactly(dp):
    full = [_uninterrupted(rank, dp) for rank in range(dp)]
    states = {kind: full[0][kind][1] for kind in SETUPS}
    for rank_result in full:  # the state is global: every rank saved the same one
        assert {kind: rank_result[kind][1] for kind in SETUPS} == states
    assert states["paired"]["epoch"] == 1 and states["unpaired"]["epoch"] == 1
    resumed = run_multirank(_resumed, dp, args=(states,), timeout=120)
    for rank in range(dp):
        for kind in SETUPS:
            steps = full[rank][kind][0]
            assert len(steps) == BEFORE + AFTER
            assert resumed[rank][kind] == steps[BEFORE:], \
                f"{kind} rank {rank} diverged after resume"
            assert steps[BEFORE:] != steps[:AFTER]  # the continuation is not just a restart
    if dp == 2:  # the ranks split each step: no sample on both
        for t in range(BEFORE + AFTER):
            ids = [set(i for m in full[r]["paired"][0][t] for i in m["sample_index"])
                   for r in range(2)]
            assert not ids[0] & ids[1]
