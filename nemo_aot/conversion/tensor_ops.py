"""Pure merge/split functions between Hugging Face and megatron-core weight layouts.

All functions work on full (TP=1) tensors, keep dtypes and values bit for bit, and are each
other's inverses. Tensor-parallel sharding is megatron's business (its sharded state dict), never
ours, so none of this depends on a parallel layout.

* QKV: megatron's ``linear_qkv`` interleaves per query group (GQA). For each of the G key/value
  groups it stores ``[q heads of the group (H/G x d rows), k of the group (d), v of the group
  (d)]``; Hugging Face keeps ``q_proj`` [H*d], ``k_proj`` [G*d], ``v_proj`` [G*d] apart. The same
  layout applies to the QKV bias (Qwen2), with the trailing input dimension absent.
* Gated MLP: megatron's ``linear_fc1`` is ``[gate; up]`` stacked on the output dimension (that is
  the layout its sharded state dict stores at every TP size).
* Vocabulary: megatron pads the embedding/output rows to a multiple of
  ``make_vocab_size_divisible_by * TP``; padding rows are zero here and dropped on export.
"""

from __future__ import annotations

import torch


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              num_query_groups: int) -> torch.Tensor:
    """[H*d, ...], [G*d, ...], [G*d, ...] -> megatron's per-group interleaved [(H + 2G)*d, ...]."""
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"QKV shapes do not fit together: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    groups = num_query_groups
    if q.shape[0] % groups or k.shape[0] % groups or q.shape[0] % k.shape[0]:
        raise ValueError(f"QKV rows (q {q.shape[0]}, k/v {k.shape[0]}) are not divisible into "
                         f"{groups} query groups")
    tail = q.shape[1:]
    parts = [t.reshape(groups, -1, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv`: megatron ``linear_qkv`` -> (q, k, v) in Hugging Face layout."""
    heads_per_group = num_attention_heads // num_query_groups
    rows = (num_attention_heads + 2 * num_query_groups) * head_dim
    if num_attention_heads % num_query_groups or qkv.shape[0] != rows:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows; {num_attention_heads} heads in "
                         f"{num_query_groups} groups of head_dim {head_dim} need {rows}")
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def merge_gated_qkv(q_gate: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    num_attention_heads: int, num_query_groups: int) -> torch.Tensor:
    """Gated attention (Qwen3.5): Hugging Face ``q_proj`` holds per head [query; gate] rows;
    megatron's ``linear_qkv`` (attention_output_gate) holds per query group
    [queries; gates; key; value]."""
    tail = q_gate.shape[1:]
    pairs = q_gate.reshape(num_attention_heads, 2, -1, *tail)
    q, gate = (pairs[:, j].reshape(-1, *tail) for j in (0, 1))
    parts = [t.reshape(num_query_groups, -1, *tail) for t in (q, gate, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_gated_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_gated_qkv`."""
    per_group = num_attention_heads // num_query_groups
    rows = (2 * num_attention_heads + 2 * num_query_groups) * head_dim
    if num_attention_heads % num_query_groups or qkv.shape[0] != rows:
        raise ValueError(f"gated linear_qkv has {qkv.shape[0]} rows; {num_attention_heads} heads "
                         f"in {num_query_groups} groups of head_dim {head_dim} need {rows}")
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_query_groups, -1, *tail)
    sizes = [per_group * head_dim, per_group * head_dim, head_dim, head_dim]
    q, gate, k, v = (t.reshape(-1, *tail) for t in torch.split(grouped, sizes, dim=1))
    pairs = torch.stack([q.reshape(num_attention_heads, head_dim, *tail),
                         gate.reshape(num_attention_heads, head_dim, *tail)], dim=1)
    return pairs.reshape(-1, *tail), k, v


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate_proj [F, h], up_proj [F, h] -> megatron ``linear_fc1`` [2F, h] = [gate; up]."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} projections differ")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_gate_up`."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows up to ``padded_rows`` (megatron's TP-divisible vocabulary)."""
    if weight.shape[0] > padded_rows:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size "
                         f"{padded_rows}")
    if weight.shape[0] == padded_rows:
        return weight
    pad = weight.new_zeros((padded_rows - weight.shape[0], *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop megatron's padding rows: the first ``vocab_size`` rows."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows, fewer than the vocabulary "
                         f"size {vocab_size}")
    return weight[:vocab_size]


def split_gdn_in_proj(in_proj: torch.Tensor, cfg) -> tuple[torch.Tensor, ...]:
    """megatron GatedDeltaNet ``in_proj`` (TP=1: [q; k; v; z; beta; alpha] rows) -> Hugging Face
    ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""
    la = cfg.linear_attention
    qk, v = la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim
    sizes = [2 * qk + v, v, la.num_value_heads, la.num_value_heads]
    if in_proj.shape[0] != sum(sizes):
        raise ValueError(f"in_proj has {in_proj.shape[0]} rows, the linear_attention config "
                         f"needs {sum(sizes)}")
    return tuple(torch.split(in_proj, sizes, dim=0))


__all__ = ["merge_qkv", "split_qkv", "merge_gated_qkv", "split_gated_qkv", "split_gdn_in_proj",
           "merge_gate_up", "split_gate_up", "pad_vocab", "unpad_vocab"]
