"""Reference policy log-probs: cached from one scoring pass, by swapping weights on the CPU, or
by switching LoRA adapters off.

A reference is data the step receives: each kind has ``attach(micro_batches, split)``, which
adds ``reference_logps`` to every micro-batch before the objective sees it (``NoReference``,
for SFT, adds nothing). ``nemo_aot.algorithms.run.build_reference`` picks the kind from
``alignment.reference_policy``.

All three score with the *same* forward code as the policy (``PolicyRunner.score``), so at
step 0 - before any update - the policy and reference log-probs of a batch are bitwise equal and
every reward is exactly 0 (a failure seen elsewhere when the reference runs a different code
path).

* ``cached`` (default): before training, score every sample once - in the training sampler's
  epoch-0 order, so step 0 sees identical batches - and keep (summed log-prob, token count) per
  response, keyed by (chosen/rejected, sample index). Saved as a tensors-only file named by a
  fingerprint of the data and the model's origin, reused across epochs and runs.
* ``cpu_swap``: reference weights live in CPU memory; each global batch swaps them into the
  model, scores the batch, and swaps the policy back. Costs one forward and two weight copies
  per step, needs no scoring pass and no disk.
* ``adapters_off`` (LoRA): the reference is the frozen base, i.e. the same model with every
  adapter switched off; each global batch is scored that way. One forward per step, no copy,
  no cache. Fresh adapters start with B = 0, so step 0 is exact as with the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aot.distributed.parallel import compute_device
from nemo_aot.distributed.ranks import StopRequested, any_ranks, from_rank0, rank
from nemo_aot.models.lora import adapters_disabled
from nemo_aot.progress import Progress

logger = logging.getLogger(__name__)


def fingerprint(**parts) -> str:
    """Stable short hash of JSON-serializable parts (data identity, model origin, options)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _gather_scores(local: list[tuple[torch.Tensor, ...]]):
    """Every rank's (label, index, logp, count) rows, on every rank (last stage -> all)."""
    rows = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        rows = [torch.cat([t[i].double().cpu() if i >= 2 else t[i].long().cpu() for t in local])
                for i in range(4)] if local else [torch.zeros(0)] * 4
        if parallel_state.get_data_parallel_world_size() > 1:
            box = [None] * parallel_state.get_data_parallel_world_size()
            dist.all_gather_object(box, rows, group=parallel_state.get_data_parallel_group())
            rows = [torch.cat([b[i] for b in box]) for i in range(4)]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [rows]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        rows = box[0]
    return rows


class ReferenceTable:
    """(summed log-prob, token count) per response, looked up by (label, sample_index)."""

    def __init__(self, sizes: tuple[int, int]):
        self.logp = [torch.full((n,), float("nan"), dtype=torch.float64) for n in sizes]
        self.count = [torch.zeros(n, dtype=torch.float64) for n in sizes]

    def add(self, rows) -> None:
        """Fill missing entries only: the first scoring of a response (step order) wins."""
        label, index, logp, count = rows
        real = index >= 0
        for side, mask in ((0, label.bool() & real), (1, ~label.bool() & real)):
            mask = mask.clone()
            mask[mask.clone()] = torch.isnan(self.logp[side][index[mask]])
            self.logp[side][index[mask]] = logp[mask]
            self.count[side][index[mask]] = count[mask]

    def covers(self, micro_batches: list[dict]) -> bool:
        for mb in micro_batches:
            for side, mask in ((0, mb["label"]), (1, ~mb["label"])):
                idx = mb["sample_index"][mask & (mb["sample_index"] >= 0)]
                if torch.isnan(self.logp[side][idx]).any():
                    return False
        return True

    def missing(self) -> int:
        return sum(int(torch.isnan(t).sum()) for t in self.logp)

    def lookup(self, mb: dict, length_normalize: bool) -> torch.Tensor:
        out = torch.zeros(mb["label"].shape[0], dtype=torch.float64)
        for side, mask in ((0, mb["label"]), (1, ~mb["label"])):
            mask = mask & (mb["sample_index"] >= 0)
            idx = mb["sample_index"][mask]
            values = self.logp[side][idx]
            if length_normalize:
                values = values / self.count[side][idx].clamp(min=1)
            out[mask] = values
        if torch.isnan(out).any():
            raise RuntimeError("reference log-prob missing for a sample: the reference cache does "
                               "not cover this data; delete it or change reference_cache_dir")
        return out.float()

    def state(self) -> dict:
        return {"logp": self.logp, "count": self.count}

    @classmethod
    def from_state(cls, state: dict) -> "ReferenceTable":
        table = cls((0, 0))
        table.logp, table.count = list(state["logp"]), list(state["count"])
        return table


def score_into_table(policy, batches: Iterable[list[dict]], sizes: tuple[int, int],
                     total: Optional[int] = None, what: str = "reference scoring",
                     stop_requested: Optional[Callable[[], bool]] = None) -> ReferenceTable:
    """Score batches into a new table, skipping global batches whose responses all have a value
    already. Per global batch, one all-reduce agrees on both decisions every rank must take
    together: whether to score it, and whether any rank was asked to stop (``stop_requested``,
    this rank's own view, e.g. a preemption signal); a stop raises ``StopRequested`` on every
    rank. Rank 0 logs progress with an ETA over ``total`` global batches."""
    table = ReferenceTable(sizes)
    stop_requested = stop_requested or (lambda: False)
    with Progress(total=total, what=what, unit="global batches") as progress:
        for micro_batches in batches:
            needed, stop = any_ranks([not table.covers(micro_batches), stop_requested()])
            if stop:
                raise StopRequested(what)
            if needed:
                table.add(_gather_scores(policy.score(micro_batches)))
            progress.update()
    return table


def cached_reference(policy, batches: Iterable[list[dict]], sizes: tuple[int, int],
                     cache_path: str, total: Optional[int] = None,
                     what: str = "reference scoring",
                     stop_requested: Optional[Callable[[], bool]] = None) -> ReferenceTable:
    """Load the table from ``cache_path`` or score it and write it there (rank 0, atomically).

    Rank 0 alone reads the cache and decides whether it fits this data; its table reaches every
    rank by broadcast. Other ranks may not see the file at all (node-local output folders, NFS
    attribute caching after a requeue): deciding on each rank's own view would split the ranks
    into scorers, whose collectives never complete, and skippers."""
    state = _read_cache(cache_path, sizes) if rank() == 0 else None
    state = from_rank0(state)
    if state is not None:
        return ReferenceTable.from_state(state)
    table = score_into_table(policy, batches, sizes, total, what, stop_requested)
    if table.missing():
        raise RuntimeError(f"the scoring pass left {table.missing()} responses without a reference "
                           "log-prob (sampler did not cover the split)")
    if rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        tmp = f"{cache_path}.tmp{os.getpid()}"
        torch.save(table.state(), tmp)
        os.replace(tmp, cache_path)
        logger.info("reference log-probs: wrote %s", cache_path)
    return table


def _read_cache(cache_path: str, sizes: tuple[int, int]) -> Optional[dict]:
    """The cached table's state when ``cache_path`` holds one for this data, else None."""
    if not os.path.exists(cache_path):
        return None
    state = torch.load(cache_path, map_location="cpu", weights_only=True)
    table = ReferenceTable.from_state(state)
    if tuple(t.numel() for t in table.logp) == tuple(sizes) and table.missing() == 0:
        logger.info("reference log-probs: reusing %s", cache_path)
        return table.state()
    logger.warning("reference cache %s does not match this data; rescoring", cache_path)
    return None


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    copy = torch.empty_like(tensor, device="cpu", pin_memory=pin)
    copy.copy_(tensor.detach())
    return copy


class CachedReference:
    """Reference log-probs looked up in tables scored before training (one per split)."""

    def __init__(self, tables: dict[str, ReferenceTable], length_normalize: bool):
        self.tables, self.length_normalize = tables, length_normalize

    def attach(self, micro_batches: list[dict], split: str = "train") -> list[dict]:
        if split not in self.tables:
            raise RuntimeError(f"cached reference for split {split!r} not set up")
        return attach_reference(micro_batches, self.tables[split], self.length_normalize)


class NoReference:
    """No reference policy (SFT): micro-batches pass as they are."""

    def attach(self, micro_batches: list[dict], split: str = "train") -> list[dict]:
        return micro_batches


class CpuSwapReference:
    """Reference weights in CPU memory, swapped into the policy to score each global batch (the
    policy's weights at construction, i.e. before any update)."""

    def __init__(self, policy, length_normalize: bool):
        self.policy, self.length_normalize = policy, length_normalize
        self.params = [p for c in policy.chunks for p in c.parameters()]
        # Page-locked on a GPU host, so the copies below are asynchronous DMA (from pageable
        # memory a non_blocking copy is a synchronous one). The policy's own host buffers are
        # allocated once and reused every swap.
        pin = torch.cuda.is_available()
        self.reference = [_host_copy(p, pin) for p in self.params]
        self.parked = [torch.empty_like(r, pin_memory=pin) for r in self.reference]

    @torch.no_grad()
    def _load_reference(self) -> None:
        """Park the policy's weights in their host buffers, then load the reference's (the
        copies are ordered on the current stream: each weight parks before it is overwritten)."""
        for p, keep, ref in zip(self.params, self.parked, self.reference):
            keep.copy_(p.detach(), non_blocking=True)
            p.copy_(ref, non_blocking=True)

    @torch.no_grad()
    def _restore_policy(self) -> None:
        for p, keep in zip(self.params, self.parked):
            p.copy_(keep, non_blocking=True)

    def attach(self, micro_batches: list[dict], split: str = "train") -> list[dict]:
        """This global batch's reference log-probs (all ranks score it together)."""
        sizes = batch_table_sizes(micro_batches)
        self.policy.sync_params()  # the policy's weights are parked and restored as they are
        self._load_reference()
        try:
            table = score_into_table(self.policy, [micro_batches], sizes)
        finally:
            self._restore_policy()
        return attach_reference(micro_batches, table, self.length_normalize)


class AdaptersOffReference:
    """The base model under LoRA: each global batch scored with every adapter switched off."""

    def __init__(self, policy, length_normalize: bool):
        self.policy, self.length_normalize = policy, length_normalize

    def attach(self, micro_batches: list[dict], split: str = "train") -> list[dict]:
        """This global batch's reference log-probs (all ranks score it together)."""
        sizes = batch_table_sizes(micro_batches)
        with adapters_disabled(list(self.policy.chunks)):
            table = score_into_table(self.policy, [micro_batches], sizes)
        return attach_reference(micro_batches, table, self.length_normalize)


def batch_table_sizes(micro_batches: list[dict]) -> tuple[int, int]:
    """(chosen, rejected) table sizes covering one global batch's sample indices, the same on
    every rank (one all-reduce)."""
    sizes = [0, 0]
    for mb in micro_batches:
        for side, mask in ((0, mb["label"]), (1, ~mb["label"])):
            if (mb["sample_index"][mask] >= 0).any():
                sizes[side] = max(sizes[side], int(mb["sample_index"][mask].max()) + 1)
    t = torch.tensor(sizes, device=compute_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def attach_reference(micro_batches: list[dict], table: ReferenceTable,
                     length_normalize: bool) -> list[dict]:
    for mb in micro_batches:
        mb["reference_logps"] = table.lookup(mb, length_normalize)
    return micro_batches


__all__ = ["ReferenceTable", "CachedReference", "CpuSwapReference", "AdaptersOffReference",
           "NoReference", "cached_reference", "attach_reference", "batch_table_sizes",
           "fingerprint", "score_into_table"]
