"""Samplers and collation: pairs together, DP invariance, epochs, ratios, resume, padding, masks."""

import copy

import pytest
import torch

from nemo_aot.data import DataConfig, collate_step, make_batch_sampler, make_batches
from nemo_aot.data.synthetic import synthetic_preference_data


def _take(sampler, n):
    """``n`` steps, continuing across epochs (each ``iter`` resumes from the sampler's state)."""
    out = []
    while len(out) < n:
        for step in sampler:
            out.append(step)
            if len(out) == n:
                break
    return out


def _sampler(data, rank=0, dp=1, gbs=8, mbs=2, **kw):
    kw.setdefault("seed", 7)
    return make_batch_sampler(data, gbs, mbs, rank, dp, **kw)


def test_paired_rows_keep_each_pair_together():
    data = synthetic_preference_data("paired", (20,))
    step = next(iter(_sampler(data, gbs=8, mbs=4)))
    for micro in collate_step(data, step):
        m = micro["input_ids"].shape[0] // 2
        assert micro["label"].tolist() == [True] * m + [False] * m
        assert torch.equal(micro["sample_index"][:m], micro["sample_index"][m:])
        assert micro["pair_index"].tolist() == list(range(m)) * 2
        for b in range(m):  # chosen and rejected of one pair share the prompt
            p = int(micro["prompt_lengths"][b])
            assert torch.equal(micro["input_ids"][b, :p], micro["input_ids"][b + m, :p])


@pytest.mark.parametrize("dp", [2, 4])
def test_steps_do_not_depend_on_dp_size(dp):
    data = synthetic_preference_data("paired", (50,))
    single = _take(_sampler(data, gbs=8, mbs=2), 15)  # crosses epoch boundaries (6 steps per epoch)
    per_rank = [_take(_sampler(data, rank=r, dp=dp, gbs=8, mbs=8 // (2 * dp) or 1), 15)
                for r in range(dp)]
    flat = [[idx for micro in step for idx in micro[0]] for step in single]
    for t in range(15):
        assert [i for r in range(dp) for micro in per_rank[r][t] for i in micro[0]] == flat[t]


def test_epochs_are_seeded_permutations():
    data = synthetic_preference_data("paired", (50,))
    sampler = _sampler(data, gbs=8, mbs=2)
    assert sampler.steps_per_epoch == 6
    epochs = [[i for step in list(sampler) for micro in step for i in micro[0]] for _ in range(3)]
    for order in epochs:
        assert len(order) == 48 and len(set(order)) == 48
    assert epochs[0] != epochs[1] != epochs[2]
    again = [[i for step in list(s) for micro in step for i in micro[0]]
             for s in [_sampler(data, gbs=8, mbs=2)]]
    assert again[0] == epochs[0]
    other_seed = [i for step in list(_sampler(data, gbs=8, mbs=2, seed=8))
                  for micro in step for i in micro[0]]
    assert other_seed != epochs[0]
    in_order = [i for step in list(_sampler(data, gbs=8, mbs=2, shuffle=False))
                for micro in step for i in micro[0]]
    assert in_order == list(range(48))


@pytest.mark.parametrize("resume_dp", [1, 2])
def test_state_restores_exactly_across_epochs(resume_dp):
    # 1 + 3 per micro-batch: 3 steps per epoch
    data = synthetic_preference_data("unpaired", (6, 20))
    reference = _take(_sampler(data, gbs=8, mbs=4), 20)  # crosses six epoch boundaries
    first = _sampler(data, gbs=8, mbs=4)
    assert _take(first, 7) == reference[:7]
    state = copy.deepcopy(first.state_dict())
    assert state["consumed_samples"] == 7 * 8
    assert state["epoch"] == 2 and state["step_in_epoch"] == 1
    resumed = [_sampler(data, rank=r, dp=resume_dp, gbs=8, mbs=4) for r in range(resume_dp)]
    for s in resumed:
        s.load_state_dict(state)
    after = [_take(s, 13) for s in resumed]
    for t in range(13):
        merged = [tuple(i for r in range(resume_dp) for micro in after[r][t] for i in micro[k])
                  for k in range(2)]
        assert merged == [tuple(i for micro in reference[7 + t] for i in micro[k])
                          for k in range(2)]


def test_state_from_other_data_or_seed_is_refused():
    data = synthetic_preference_data("paired", (50,))
    state = _sampler(data).state_dict()
    with pytest.raises(ValueError, match="seed=7 but this run has 8"):
        _sampler(data, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="stream_sizes"):
        _sampler(synthetic_preference_data("paired", (51,))).load_state_dict(state)
    with pytest.raises(ValueError, match="per_step"):
        _sampler(data, gbs=16).load_state_dict(state)


def test_unpaired_three_times_more_negatives_batches_as_configured():
    data = synthetic_preference_data("unpaired", (100, 300))
    for fraction, counts, steps in ((None, (1, 3), 25), (0.25, (1, 3), 25), (0.5, (2, 2), 12)):
        ranks = [_sampler(data, rank=r, dp=2, gbs=16, mbs=4, positive_fraction=fraction)
                 for r in range(2)]
        assert all(s.steps_per_epoch == steps for s in ranks)
        seen_pos, seen_neg = [], []
        for sampler in ranks:
            for step in sampler:
                assert len(step) == 2  # micro-batches per rank
                for pos, neg in step:
                    assert (len(pos), len(neg)) == counts
                    seen_pos += pos
                    seen_neg += neg
        assert len(seen_pos) == len(set(seen_pos)) == steps * 4 * counts[0]
        assert len(seen_neg) == len(set(seen_neg)) == steps * 4 * counts[1]
    step = next(iter(_sampler(data, gbs=16, mbs=4)))
    micro = collate_step(data, step)[0]
    assert micro["label"].tolist() == [True, False, False, False]
    assert (micro["pair_index"] == -1).all()


def test_unpaired_validation_covers_both_streams_once_with_filler():
    data = synthetic_preference_data("unpaired", (5, 13))
    ranks = [list(_sampler(data, rank=r, dp=2, gbs=8, mbs=4, train=False)) for r in range(2)]
    # 1 positive + 3 negatives per micro-batch, 2 + 6 per step: ceil(5 / 2) = ceil(13 / 6) = 3 steps
    assert len(ranks[0]) == len(ranks[1]) == 3
    pos = [i for steps in ranks for step in steps for micro in step for i in micro[0]]
    neg = [i for steps in ranks for step in steps for micro in step for i in micro[1]]
    assert sorted(i for i in pos if i >= 0) == list(range(5)) and pos.count(-1) == 3 * 2 - 5
    assert sorted(i for i in neg if i >= 0) == list(range(13)) and neg.count(-1) == 3 * 6 - 13


def test_collate_shift_mask_and_padding_convention():
    data = synthetic_preference_data("paired", (8,))
    step = next(iter(_sampler(data, gbs=4, mbs=2, shuffle=False)))
    micro = collate_step(data, step, pad_to_multiple_of=16)[0]
    ids, labels, mask = micro["input_ids"], micro["labels"], micro["loss_mask"]
    assert ids.shape[1] % 16 == 0
    assert ids.dtype == labels.dtype == torch.int64 and mask.dtype == torch.float32
    for b, (index, slot) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        ex = data.streams[0][index]
        seq = ex.prompt_ids.tolist() + ex.response_ids[slot].tolist()
        n, p = len(seq), len(ex.prompt_ids)
        assert ids[b, :n].tolist() == seq and (ids[b, n:] == 0).all()
        assert labels[b, :n - 1].tolist() == seq[1:] and (labels[b, n - 1:] == 0).all()
        assert mask[b].nonzero().flatten().tolist() == list(range(p - 1, n - 1))
        assert labels[b][mask[b].bool()].tolist() == ex.response_ids[slot].tolist()
        assert micro["seq_lengths"][b] == n and micro["prompt_lengths"][b] == p
    assert (micro["position_ids"] == torch.arange(ids.shape[1])).all()
    assert (micro["sample_weight"] == 1).all()


def test_uniform_step_length_pads_every_micro_batch_alike():
    data = synthetic_preference_data("paired", (64,), prompt_len=(1, 30))
    step = next(iter(_sampler(data, gbs=16, mbs=2)))
    varied = {m["input_ids"].shape[1] for m in collate_step(data, step)}
    uniform = {m["input_ids"].shape[1] for m in collate_step(data, step, uniform_length=True)}
    assert len(varied) > 1 and uniform == {max(varied)}


def test_make_batches_reads_the_config_and_resumes():
    data = synthetic_preference_data("unpaired", (40, 40))
    cfg = DataConfig(seed=3, pad_to_multiple_of=8, unpaired_positive_fraction=0.25)
    batches = make_batches(data, cfg, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1)
    steps = _take(batches, 3)
    assert all(m["input_ids"].shape[1] % 8 == 0 and m["label"].sum() == 1 for s in steps for m in s)
    state = batches.state_dict()
    following = _take(batches, 2)
    again = make_batches(data, cfg, 8, 4, 0, 1)
    again.load_state_dict(state)
    for a, b in zip(_take(again, 2), following):
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_batch_sizes_must_divide():
    data = synthetic_preference_data("paired", (50,))
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        _sampler(data, dp=2, gbs=6, mbs=2)
    with pytest.raises(ValueError, match="micro_batch_size >= 2"):
        _sampler(synthetic_preference_data("unpaired", (5, 5)), gbs=4, mbs=1)
