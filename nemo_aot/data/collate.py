"""Collate micro-batches into padded tensors in megatron GPT's convention.

A micro-batch dict (B rows, L = padded length):
  input_ids      int64   [B, L]  prompt + response tokens, right-padded with the pad id
  labels         int64   [B, L]  already shifted: labels[:, t] = input_ids[:, t + 1]; the pad id
                                 where there is no next token (last column, padding); every entry
                                 is a valid token id, as megatron's vocab-parallel loss needs
  loss_mask      float32 [B, L]  1.0 where labels[:, t] is a response token, else 0.0; so
                                 (logprob(labels) * loss_mask).sum(-1) is log pi(response | prompt)
  position_ids   int64   [B, L]  0..L-1 on every row
  seq_lengths    int64   [B]     real (unpadded) tokens per row (1 for a filler row); padding
                                 is on the right, so a causal mask alone is exact for real tokens
  prompt_lengths int64   [B]     prompt tokens per row (BOS included)
  label          bool    [B]     True for chosen/positive rows, False for rejected/negative rows
  pair_index     int64   [B]     paired: the pair's slot in the micro-batch (rows i and i + B/2
                                 are one pair); unpaired: -1
  sample_index   int64   [B]     the example's index in its stream (pairs, or positives /
                                 negatives); with ``label`` a stable key for cached reference
                                 log-probs; -1 for filler rows
  sample_weight  float32 [B]     1.0 for real rows, 0.0 for filler (validation padding): a filler
                                 row also has an all-zero loss_mask and must be left out of sorts
  reward         float32 [B]     per-response reward from the data (nemo_dpo), NaN when absent
Row order: paired = all chosen rows, then all rejected rows (same pair order); unpaired = the
positives, then the negatives.

Packed micro-batches (``data.pack_sequences``): the per-row vectors above stay one entry per
sequence ("document", D of them, same order), while the token tensors hold R <= D packed rows:
each row concatenates whole documents (first-fit decreasing up to ``max_seq_length`` tokens)
and one more tensor says which document each token belongs to:
  doc_ids        int64   [R, L]  the document (0..D-1) of each token, -1 for padding
position_ids restart at 0 in every document, labels and loss_mask never cross a document's end,
and attention is causal within a document only (``document_attention_mask``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from nemo_aot.data.sampler import FILLER, MicroBatchIndices, make_batch_sampler


def _rows(data, indices: MicroBatchIndices) -> list:
    """(example or None, response slot, is_chosen, pair slot, sample index) per row, in row
    order."""
    if data.kind == "paired":
        (pairs,) = indices
        return ([(_get(data.streams[0], i), 0, True, j, i) for j, i in enumerate(pairs)]
                + [(_get(data.streams[0], i), 1, False, j, i) for j, i in enumerate(pairs)])
    positives, negatives = indices
    return ([(_get(data.streams[0], i), 0, True, -1, i) for i in positives]
            + [(_get(data.streams[1], i), 0, False, -1, i) for i in negatives])


def _get(stream: list, index: int):
    return None if index == FILLER else stream[index]


def _length(example, slot: int) -> int:
    return 1 if example is None else len(example.prompt_ids) + len(example.response_ids[slot])


def micro_batch_length(data, indices: MicroBatchIndices) -> int:
    """Longest real row of a micro-batch (before rounding)."""
    return max(_length(ex, slot) for ex, slot, *_ in _rows(data, indices))


def collate_micro_batch(data, indices: MicroBatchIndices, pad_to_multiple_of: int = 1,
                        length: Optional[int] = None) -> dict:
    """Pad one micro-batch to its longest row (or ``length``), rounded up to ``pad_to_multiple_of``.

    Rounding may take L past ``max_seq_length``; keep the model's position limit a multiple of it.
    """
    rows = _rows(data, indices)
    longest = max(_length(ex, slot) for ex, slot, *_ in rows)
    target = longest if length is None else length
    assert target >= longest, f"requested length {length} is shorter than the longest row {longest}"
    width = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = np.full((batch, width), data.pad_id, dtype=np.int64)
    labels = np.full((batch, width), data.pad_id, dtype=np.int64)
    loss_mask = np.zeros((batch, width), dtype=np.float32)
    seq_lengths = np.ones(batch, dtype=np.int64)
    prompt_lengths = np.ones(batch, dtype=np.int64)
    reward = np.full(batch, np.nan, dtype=np.float32)
    for b, (example, slot, _, _, _) in enumerate(rows):
        if example is None:
            continue
        prompt = example.prompt_ids
        seq = np.concatenate([prompt, example.response_ids[slot]])
        n = len(seq)
        input_ids[b, :n] = seq
        labels[b, :n - 1] = seq[1:]
        # Position t predicts token t + 1: response tokens sit at len(prompt)..n-1.
        loss_mask[b, len(prompt) - 1:n - 1] = 1.0
        seq_lengths[b], prompt_lengths[b] = n, len(prompt)
        reward[b] = example.rewards[slot]
    real = [ex is not None for ex, *_ in rows]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.arange(width, dtype=torch.int64).unsqueeze(0)
                             .expand(batch, width).contiguous(),
        "seq_lengths": torch.from_numpy(seq_lengths),
        "prompt_lengths": torch.from_numpy(prompt_lengths),
        "label": torch.tensor([r[2] for r in rows], dtype=torch.bool),
        "pair_index": torch.tensor([r[3] for r in rows], dtype=torch.int64),
        "sample_index": torch.tensor([r[4] if ok else FILLER for r, ok in zip(rows, real)],
                                     dtype=torch.int64),
        "sample_weight": torch.tensor(real, dtype=torch.float32),
        "reward": torch.from_numpy(reward),
    }


def pack_documents(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: document indices into rows of at most ``capacity`` tokens (a
    longer document gets a row of its own); within a row, documents keep their order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(r) for r in rows]


def _packed_layout(data, indices: MicroBatchIndices, capacity: int):
    rows = _rows(data, indices)
    lengths = [_length(ex, slot) for ex, slot, *_ in rows]
    return rows, lengths, pack_documents(lengths, capacity)


def packed_shape(data, indices: MicroBatchIndices, capacity: int) -> tuple[int, int]:
    """(packed rows, longest packed row) of a micro-batch."""
    _, lengths, packing = _packed_layout(data, indices, capacity)
    return len(packing), max(sum(lengths[i] for i in row) for row in packing)


def collate_packed_micro_batch(data, indices: MicroBatchIndices, capacity: int,
                               pad_to_multiple_of: int = 1, length: Optional[int] = None,
                               num_rows: Optional[int] = None) -> dict:
    """One micro-batch with its sequences packed into rows of at most ``capacity`` tokens (see
    the module docstring); ``length``/``num_rows`` pad it to a step-wide shape."""
    batch = collate_micro_batch(data, indices)  # the per-document vectors and token rows
    _, lengths, packing = _packed_layout(data, indices, capacity)
    longest = max(sum(lengths[i] for i in row) for row in packing)
    target = longest if length is None else length
    assert target >= longest, f"requested length {length} is shorter than the longest row {longest}"
    width = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    count = len(packing) if num_rows is None else num_rows
    assert count >= len(packing), f"{num_rows} rows cannot hold {len(packing)} packed rows"
    out = {"input_ids": torch.full((count, width), data.pad_id, dtype=torch.int64),
           "labels": torch.full((count, width), data.pad_id, dtype=torch.int64),
           "loss_mask": torch.zeros(count, width, dtype=torch.float32),
           "position_ids": torch.zeros(count, width, dtype=torch.int64),
           "doc_ids": torch.full((count, width), -1, dtype=torch.int64)}
    for r, row in enumerate(packing):
        start = 0
        for doc in row:
            n = lengths[doc]
            span = slice(start, start + n)
            for key in ("input_ids", "labels", "loss_mask"):
                out[key][r, span] = batch[key][doc, :n]
            out["position_ids"][r, span] = torch.arange(n)
            out["doc_ids"][r, span] = doc
            start += n
    batch.update(out)
    return batch


def collate_step(data, step: Sequence[MicroBatchIndices], pad_to_multiple_of: int = 1,
                 uniform_length: bool = False, pack_capacity: Optional[int] = None) -> list[dict]:
    """Collate one step's micro-batches; ``uniform_length`` pads them all to the step's longest
    (packed: and to the step's largest row count); ``pack_capacity`` packs them."""
    if pack_capacity is None:
        length = max(micro_batch_length(data, m) for m in step) if uniform_length else None
        return [collate_micro_batch(data, m, pad_to_multiple_of, length) for m in step]
    length = num_rows = None
    if uniform_length:
        shapes = [packed_shape(data, m, pack_capacity) for m in step]
        num_rows, length = max(r for r, _ in shapes), max(w for _, w in shapes)
    return [collate_packed_micro_batch(data, m, pack_capacity, pad_to_multiple_of, length,
                                       num_rows) for m in step]


def slot_efficiency(data, steps, capacity: int, pad_to_multiple_of: int = 1) -> dict:
    """Share of the token slots that hold real tokens over ``steps`` (lists of micro-batch
    indices), padded (every sequence to its micro-batch's longest) and packed (rows of up to
    ``capacity``), each micro-batch rounded up to ``pad_to_multiple_of``; from lengths alone."""
    def rounded(n):
        return -(-n // pad_to_multiple_of) * pad_to_multiple_of

    real = padded = packed = 0
    for step in steps:
        for indices in step:
            rows, lengths, packing = _packed_layout(data, indices, capacity)
            real += sum(n for n, (ex, *_) in zip(lengths, rows) if ex is not None)
            padded += len(lengths) * rounded(max(lengths))
            packed += len(packing) * rounded(max(sum(lengths[i] for i in r) for r in packing))
    return {"padded": real / max(padded, 1), "packed": real / max(packed, 1)}


def token_slots(micro_batches: Sequence[dict]) -> tuple[int, int]:
    """(real tokens, token slots) of collated micro-batches: real / slots is the share of the
    computed positions that hold data (padding and filler rows are the rest)."""
    real = sum(int(mb["seq_lengths"][mb["sample_weight"] > 0].sum()) for mb in micro_batches)
    return real, sum(int(mb["input_ids"].numel()) for mb in micro_batches)


class PreferenceBatches:
    """One rank's steps as lists of collated micro-batches; resumable through the sampler's
    state."""

    def __init__(self, data, sampler, pad_to_multiple_of: int = 1,
                 uniform_step_length: bool = False, pack_capacity: Optional[int] = None):
        self.data, self.sampler = data, sampler
        self.pad_to_multiple_of, self.uniform_step_length = pad_to_multiple_of, uniform_step_length
        self.pack_capacity = pack_capacity

    def __iter__(self):
        for step in self.sampler:
            yield collate_step(self.data, step, self.pad_to_multiple_of, self.uniform_step_length,
                               self.pack_capacity)

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def make_batches(data, config, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, train: bool = True) -> PreferenceBatches:
    """Sampler + collation for ``data`` from a DataConfig (seed, shuffle, ratio, padding)."""
    sampler = make_batch_sampler(data, global_batch_size, micro_batch_size, dp_rank, dp_size,
                                 train=train, seed=config.seed, shuffle=config.shuffle,
                                 positive_fraction=config.unpaired_positive_fraction)
    return PreferenceBatches(data, sampler, config.pad_to_multiple_of, config.uniform_step_length,
                             config.max_seq_length if config.pack_sequences else None)
