"""Sequence packing of preference data (data.pack_sequences): the packer, the packed collation
against the padded one (the same documents, tokens, labels, masks and per-sequence vectors),
the per-document attention mask and sums, the slot statistics and the config rules."""

import random

import pytest
import torch

from nemo_aot.data import DataConfig, load_preference_data, load_tokenizer
from nemo_aot.data.collate import (
    collate_micro_batch,
    collate_packed_micro_batch,
    collate_step,
    pack_documents,
    slot_efficiency,
)
from nemo_aot.data.sampler import FILLER


@pytest.mark.parametrize("seed", range(5))
def test_pack_documents_places_every_document_once_within_capacity(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 30))]
    rows = pack_documents(lengths, 50)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 50 for row in rows)
    assert all(row == sorted(row) for row in rows)
    # first-fit decreasing needs at most 11/9 OPT + 1 rows; OPT >= total / capacity
    assert len(rows) <= 11 / 9 * -(-sum(lengths) // 50) + 1
    assert pack_documents(lengths, 50) == rows  # deterministic


def test_pack_documents_exact_example():
    assert pack_documents([30, 20, 25, 25, 10], 50) == [[0, 1], [2, 3], [4]]


@pytest.fixture(scope="module")
def data():
    tok = load_tokenizer("bundled:tokenizer")
    paired = load_preference_data(DataConfig(train_path="bundled:paired/train.jsonl",
                                             tokenizer_path="bundled:tokenizer"), "train", tok)
    unpaired = load_preference_data(DataConfig(train_path="bundled:unpaired/train.jsonl",
                                               format="trl_unpaired",
                                               tokenizer_path="bundled:tokenizer"), "train", tok)
    return {"paired": paired, "unpaired": unpaired}


CASES = {"paired": ([3, 17, 42, 5, FILLER],), "unpaired": ([0, 7, FILLER], [1, 2, 3, 11])}


@pytest.mark.parametrize("kind", ["paired", "unpaired"])
def test_packed_documents_equal_the_padded_rows(kind, data):
    indices = CASES[kind]
    padded = collate_micro_batch(data[kind], indices)
    packed = collate_packed_micro_batch(data[kind], indices, capacity=64, pad_to_multiple_of=8)
    docs = padded["label"].shape[0]
    for key in ("seq_lengths", "prompt_lengths", "label", "pair_index", "sample_index",
                "sample_weight"):
        assert torch.equal(packed[key], padded[key]), key
    assert packed["input_ids"].shape[0] < docs and packed["input_ids"].shape[1] % 8 == 0
    assert packed["input_ids"].shape[1] <= 64
    for doc in range(docs):
        where = packed["doc_ids"] == doc
        n = int(padded["seq_lengths"][doc])
        assert int(where.sum()) == n
        for key in ("input_ids", "labels", "loss_mask"):
            assert torch.equal(packed[key][where], padded[key][doc, :n]), (doc, key)
        assert torch.equal(packed["position_ids"][where], torch.arange(n))
    # padding: no loss, doc -1
    assert torch.all(packed["loss_mask"][packed["doc_ids"] < 0] == 0)


def test_step_shapes_are_uniform_when_asked(data):
    steps = [([0, 1, 2, 3],), ([4, 5],)]
    out = collate_step(data["paired"], steps, pad_to_multiple_of=4, uniform_length=True,
                       pack_capacity=64)
    assert out[0]["input_ids"].shape == out[1]["input_ids"].shape
    free = collate_step(data["paired"], steps, pack_capacity=64)
    assert free[1]["input_ids"].shape[0] < out[1]["input_ids"].shape[0]  # padded with rows
    assert torch.all(out[1]["doc_ids"][free[1]["input_ids"].shape[0]:] < 0)


def test_slot_efficiency_counts_real_tokens(data):
    steps = [[CASES["paired"]]]
    share = slot_efficiency(data["paired"], steps, capacity=64)
    mb = collate_micro_batch(data["paired"], CASES["paired"])
    real = int(mb["seq_lengths"][mb["sample_weight"] > 0].sum())
    assert share["padded"] == pytest.approx(real / mb["input_ids"].numel())
    packed = collate_packed_micro_batch(data["paired"], CASES["paired"], capacity=64)
    assert share["packed"] == pytest.approx(real / packed["input_ids"].numel())
    assert share["packed"] > share["padded"]


def test_document_mask_and_sums():
    from nemo_aot.models.layer_specs import document_attention_mask
    from nemo_aot.models.logprobs import sequence_logprobs

    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    mask = document_attention_mask(doc_ids)  # True = masked out
    allowed = ~mask[0, 0]
    assert allowed[3].tolist() == [False, False, True, True, False, False]
    assert allowed[1].tolist() == [True, True, False, False, False, False]
    assert bool(allowed[5, 5])  # padding sees itself: no empty softmax row
    token = torch.arange(12, dtype=torch.float32).view(2, 6)
    loss_mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    sums, counts = sequence_logprobs(token, loss_mask, doc_ids=doc_ids, num_docs=3)
    assert sums.tolist() == [1.0, 7.0, 6 + 7 + 8] and counts.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("overrides, key", [
    (["precision.transformer_impl=transformer_engine"], "data.pack_sequences"),
    (["init_from=null", "data.tokenizer_path=bundled:tokenizer", "model.attention_backend=unfused"],
     "data.pack_sequences"),
])
def test_packing_refused_where_the_mask_cannot_go(overrides, key):
    from nemo_aot.algorithms.resolve import compose_config

    with pytest.raises(ValueError, match=key):
        compose_config("gpt_aot", ["recipe=demo", "data.pack_sequences=true", *overrides])
