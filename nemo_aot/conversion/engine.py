"""The conversion engine: one loop for every architecture, driven by a mapping table.

A :class:`Mapping` ties one or more Hugging Face tensors to one megatron-core state-dict tensor
(full, TP=1 layout) with a ``kind`` that names the pure transform from
:mod:`nemo_aot.conversion.tensor_ops`. The engine

* checks a source checkpoint before anything is built: every expected tensor present, nothing
  unexpected, every shape as the config implies - or one ValueError listing all of it;
* streams tensors in: a many-to-one mapping (QKV, gate/up) waits until all its parts arrived,
  possibly from different shard files, so at most one shard plus a few partial groups are held
  besides the target model;
* streams tensors out in Hugging Face order, one mapping at a time.

Every source tensor must be consumed and every target produced; both are checked.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from nemo_aot.conversion import tensor_ops as ops
from nemo_aot.models.config import GPTModelConfig

logger = logging.getLogger(__name__)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Mapping:
    """Hugging Face tensor name(s) <-> one megatron tensor; ``{i}`` stands for a layer index."""

    hf: tuple[str, ...]
    mcore: str
    kind: str = "direct"
    """direct | vocab (pad rows) | qkv (per-group interleave) | gate_up (concat) | tied (an
    optional HF copy of a tied weight: checked equal, produces nothing) | qkv_gated (gated
    attention's query+gate rows) | concat (rows stacked: Gated DeltaNet's in_proj) | expert
    (slice ``part`` of a stacked [experts, ...] tensor; read only)."""
    part: Optional[int] = None
    """kind 'expert': the index along the first dimension (one HF tensor feeds many targets)."""

    def for_layer(self, i: int) -> "Mapping":
        return Mapping(tuple(n.format(i=i) for n in self.hf), self.mcore.format(i=i), self.kind,
                       self.part)


_TO_MCORE: dict[str, Callable[[Sequence[torch.Tensor], GPTModelConfig], torch.Tensor]] = {
    "direct": lambda ts, cfg: ts[0],
    "vocab": lambda ts, cfg: ops.pad_vocab(ts[0], cfg.padded_vocab_size(1)),
    "qkv": lambda ts, cfg: ops.merge_qkv(*ts, cfg.query_groups),
    "gate_up": lambda ts, cfg: ops.merge_gate_up(*ts),
    "qkv_gated": lambda ts, cfg: ops.merge_gated_qkv(*ts, cfg.num_attention_heads,
                                                     cfg.query_groups),
    "concat": lambda ts, cfg: torch.cat(list(ts), dim=0),
    "expert": lambda ts, cfg: ts[0],  # already sliced to the mapping's part
}
_TO_HF: dict[str, Callable[[torch.Tensor, GPTModelConfig], Sequence[torch.Tensor]]] = {
    "direct": lambda t, cfg: (t,),
    "vocab": lambda t, cfg: (ops.unpad_vocab(t, cfg.vocab_size),),
    "qkv": lambda t, cfg: ops.split_qkv(t, cfg.num_attention_heads, cfg.query_groups,
                                        cfg.head_dim),
    "gate_up": lambda t, cfg: ops.split_gate_up(t),
    "qkv_gated": lambda t, cfg: ops.split_gated_qkv(t, cfg.num_attention_heads,
                                                    cfg.query_groups, cfg.head_dim),
    "concat": lambda t, cfg: ops.split_gdn_in_proj(t, cfg),
}


def expand(table: Iterable[Mapping], num_layers: int) -> list[Mapping]:
    """Concrete mappings in Hugging Face order: embedding, layer by layer, then the rest."""
    table = list(table)
    layered = [m for m in table if "{i}" in m.mcore]
    first = [m for m in table if "{i}" not in m.mcore and m.mcore.startswith("embedding")
             and m.kind != "tied"]
    last = [m for m in table if "{i}" not in m.mcore and m not in first]
    return first + [m.for_layer(i) for i in range(num_layers) for m in layered] + last


def template(name: str) -> str:
    return _LAYER.sub(".layers.{i}.", name, count=1)


def _listing(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def check_source(mappings: Sequence[Mapping], available: dict[str, tuple[int, ...]],
                 expected_shapes: dict[str, tuple[int, ...]], source: str,
                 ignorable_suffixes: tuple[str, ...] = (),
                 dropped_prefixes: tuple[str, ...] = ()) -> None:
    """Refuse a checkpoint whose tensor names or shapes do not fit the config, naming all.
    Tensors under ``dropped_prefixes`` are left out on purpose; how many is logged."""
    required = {n for m in mappings if m.kind != "tied" for n in m.hf}
    optional = {n for m in mappings if m.kind == "tied" for n in m.hf}
    for prefix in dropped_prefixes:
        dropped = [n for n in available if n.startswith(prefix)]
        if dropped:
            logger.warning("%s: left out %d tensors under %s (not part of the converted "
                           "model)", source, len(dropped), prefix)
    available = {n: s for n, s in available.items() if not n.startswith(dropped_prefixes)}
    problems = []
    missing = sorted(required - available.keys())
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    extra = sorted(n for n in available.keys() - required - optional
                   if not n.endswith(ignorable_suffixes))
    if extra:
        problems.append(f"unexpected tensors (not part of this architecture or beyond "
                        f"num_hidden_layers): {_listing(extra)}")
    wrong = []
    for name in sorted((required | optional) & available.keys()):
        want = tuple(expected_shapes[template(name)])
        if tuple(available[name]) != want:
            wrong.append(f"{name} {tuple(available[name])} (config implies {want})")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong)}")
    if problems:
        raise ValueError(f"{source} does not match its config.json: " + "; ".join(problems))


def load_into(mappings: Sequence[Mapping], tensors: Iterable[tuple[str, torch.Tensor]],
              target: dict[str, torch.Tensor], cfg: GPTModelConfig, source: str) -> None:
    """Stream (name, tensor) pairs into the megatron ``target`` tensors (copy_, casting dtype)."""
    wanted = {m.mcore for m in mappings if m.kind != "tied"}
    if wanted != set(target):
        raise RuntimeError(f"mapping table and megatron model disagree: table only "
                           f"{sorted(wanted - set(target))}, model only "
                           f"{sorted(set(target) - wanted)}")
    by_name: dict[str, list[Mapping]] = {}
    for m in mappings:
        for n in m.hf:
            by_name.setdefault(n, []).append(m)
    pending: dict[Mapping, dict[str, torch.Tensor]] = {}
    tied: list[tuple[Mapping, torch.Tensor]] = []
    produced: set[str] = set()
    for name, tensor in tensors:
        # none: an ignorable derived buffer (check_source vetted the rest); several: the
        # slices of one stacked tensor
        for mapping in by_name.get(name, ()):
            parts = pending.setdefault(mapping, {})
            parts[name] = tensor if mapping.part is None else tensor[mapping.part]
            if len(parts) < len(mapping.hf):
                continue
            del pending[mapping]
            ordered = [parts[n] for n in mapping.hf]
            if mapping.kind == "tied":
                tied.append((mapping, ordered[0]))
                continue
            value = _TO_MCORE[mapping.kind](ordered, cfg)
            dest = target[mapping.mcore]
            if value.shape != dest.shape:
                raise ValueError(f"{source}: {mapping.hf} give {tuple(value.shape)} for "
                                 f"{mapping.mcore}, the model needs {tuple(dest.shape)}")
            with torch.no_grad():
                dest.copy_(value)
            produced.add(mapping.mcore)
    for mapping, value in tied:
        rows = target[mapping.mcore][: cfg.vocab_size]
        if not torch.equal(value.to(rows.dtype), rows):
            raise ValueError(f"{source}: tie_word_embeddings is true but {mapping.hf[0]} differs "
                             "from model.embed_tokens.weight; set tie_word_embeddings to false "
                             "in config.json if the output layer is separate")
    unfinished = sorted(n for parts in pending.values() for n in parts)
    not_produced = sorted(wanted - produced)
    if unfinished or not_produced:
        raise ValueError(f"{source}: incomplete checkpoint: partial groups {unfinished}, "
                         f"targets never produced {_listing(not_produced)}")


def export(mappings: Sequence[Mapping], source: dict[str, torch.Tensor],
           cfg: GPTModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield Hugging Face (name, tensor) pairs; each tensor owns its (contiguous) storage."""
    for mapping in mappings:
        if mapping.kind == "tied":
            continue
        parts = _TO_HF[mapping.kind](source[mapping.mcore].detach(), cfg)
        for name, part in zip(mapping.hf, parts, strict=True):
            yield name, part.clone(memory_format=torch.contiguous_format)


def hf_nbytes(mapping: Mapping, expected_shapes: dict[str, tuple[int, ...]],
              dtype: torch.dtype) -> int:
    """Bytes the Hugging Face tensors of one mapping take (for shard planning)."""
    if mapping.kind == "tied":
        return 0
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in mapping.hf:
        numel = 1
        for dim in expected_shapes[template(name)]:
            numel *= dim
        total += numel * item
    return total


__all__ = ["Mapping", "expand", "check_source", "load_into", "export", "hf_nbytes", "template"]
