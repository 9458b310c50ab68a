"""Deterministic, resumable batch samplers: global batch -> micro-batches on one DP rank.

Data arrive as streams: paired data has one (pairs), unpaired data two (positives, negatives).
A step draws a fixed number of examples from every stream; each micro-batch holds
``per_micro[s]`` examples of stream ``s`` (so a pair's chosen and rejected responses, or a
micro-batch's positives and negatives, always travel together).

Order. In epoch ``e`` stream ``s`` is permuted by ``PCG64([seed, e, s])`` (identity without
shuffling); step ``t`` takes that permutation's slice ``[t*q_s, (t+1)*q_s)`` with ``q_s`` the
stream's per-step count. Inside the step, DP rank ``r`` takes the ``r``-th contiguous share and
cuts it into micro-batches, so the set (and order) of examples per step does not depend on the
DP size: concatenating every rank's micro-batches at DP=n gives the micro-batches at DP=1.
Each epoch runs ``min_s floor(n_s / q_s)`` steps (a remainder is left for that epoch only; the
next epoch reshuffles).

Resume. ``state_dict()`` holds epoch, step in epoch and consumed samples (global, counted in
pairs for paired data and sequences for unpaired data); ``load_state_dict`` restores it, also at
a different DP size, and the next iteration continues exactly where the saved run stopped.
Validation runs every example once in order; the last step is filled with index -1 (filler,
masked out) so a split smaller than a global batch still works.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np

MicroBatchIndices = tuple  # one tuple of example indices per stream; -1 = filler
FILLER = -1


class _StepLayout:
    """How one step's per-stream slices are cut into this rank's micro-batches."""

    def __init__(self, stream_sizes: Sequence[int], per_micro: Sequence[int],
                 micro_batches_per_rank: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        assert len(stream_sizes) == len(per_micro) and micro_batches_per_rank >= 1
        self.stream_sizes = tuple(int(n) for n in stream_sizes)
        self.per_micro = tuple(int(c) for c in per_micro)
        self.micro_batches_per_rank = micro_batches_per_rank
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_step = tuple(c * micro_batches_per_rank * dp_size for c in self.per_micro)

    def split(self, step_slices: Sequence[np.ndarray]) -> list[MicroBatchIndices]:
        micro_batches = []
        for j in range(self.micro_batches_per_rank):
            parts = []
            for s, c in enumerate(self.per_micro):
                start = (self.dp_rank * self.micro_batches_per_rank + j) * c
                parts.append(tuple(int(i) for i in step_slices[s][start:start + c]))
            micro_batches.append(tuple(parts))
        return micro_batches


class TrainBatchSampler:
    """Yields, per step, this rank's micro-batches (lists of per-stream index tuples)."""

    def __init__(self, stream_sizes: Sequence[int], per_micro: Sequence[int],
                 micro_batches_per_rank: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True, source: str = "data",
                 stream_names: Optional[Sequence[str]] = None):
        self.layout = _StepLayout(stream_sizes, per_micro, micro_batches_per_rank, dp_rank, dp_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        names = stream_names or [f"stream {s}" for s in range(len(stream_sizes))]
        for name, n, q in zip(names, self.layout.stream_sizes, self.layout.per_step):
            if n < q:
                raise ValueError(f"{source}: {n} {name} are fewer than one global batch needs "
                                 f"({q}). Fix: lower global_batch_size (and micro_batch_size) or "
                                 f"add data")
        self.steps_per_epoch = min(n // q for n, q in zip(self.layout.stream_sizes,
                                                          self.layout.per_step))
        self.global_batch_size = sum(self.layout.per_step)
        self.epoch = 0
        self.step_in_epoch = 0
        self.consumed_samples = 0
        self._orders: tuple = (None, None)  # (epoch, per-stream permutations) cache

    def __iter__(self) -> Iterator[list[MicroBatchIndices]]:
        """The remaining steps of the current epoch; afterwards the sampler is at the next epoch."""
        while self.step_in_epoch < self.steps_per_epoch:
            step = self._step(self.epoch, self.step_in_epoch)
            # Counted as consumed when handed out: a checkpoint taken after training on this
            # step resumes at the next one.
            self.step_in_epoch += 1
            self.consumed_samples += self.global_batch_size
            yield step
        self.epoch += 1
        self.step_in_epoch = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_steps(self, epoch: int = 0) -> Iterator[list[MicroBatchIndices]]:
        """Every step of ``epoch`` without moving the sampler (for statistics)."""
        return (self._step(epoch, step) for step in range(self.steps_per_epoch))

    def _step(self, epoch: int, step: int) -> list[MicroBatchIndices]:
        orders = self._epoch_orders(epoch)
        slices = [order[step * q:(step + 1) * q] for order, q in zip(orders, self.layout.per_step)]
        return self.layout.split(slices)

    def _epoch_orders(self, epoch: int) -> tuple:
        if self._orders[0] != epoch:
            orders = tuple(
                np.random.Generator(np.random.PCG64([self.seed, epoch, s])).permutation(n)
                if self.shuffle else np.arange(n)
                for s, n in enumerate(self.layout.stream_sizes)
            )
            self._orders = (epoch, orders)
        return self._orders[1]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "consumed_samples": self.consumed_samples, "seed": self.seed,
                "shuffle": self.shuffle, "stream_sizes": list(self.layout.stream_sizes),
                "per_step": list(self.layout.per_step)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved position; refuse one saved with other data, seed or batch sizes."""
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle),
                          ("stream_sizes", list(self.layout.stream_sizes)),
                          ("per_step", list(self.layout.per_step))):
            if state.get(key) != mine:
                raise ValueError(f"sampler state was saved with {key}={state.get(key)!r} but "
                                 f"this run has {mine!r}, so the resumed order would differ. Fix: "
                                 f"resume with the same data, seed and global batch composition")
        if not 0 <= state["step_in_epoch"] <= self.steps_per_epoch:
            raise ValueError(f"sampler state step_in_epoch={state['step_in_epoch']} is outside "
                             f"this epoch (0..{self.steps_per_epoch})")
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.consumed_samples = int(state["consumed_samples"])


class ValidationBatchSampler:
    """One ordered pass over every example; the last step is padded with filler (-1) indices."""

    def __init__(self, stream_sizes: Sequence[int], per_micro: Sequence[int],
                 micro_batches_per_rank: int, dp_rank: int, dp_size: int):
        self.layout = _StepLayout(stream_sizes, per_micro, micro_batches_per_rank, dp_rank, dp_size)
        self.num_steps = max(math.ceil(n / q) for n, q in zip(self.layout.stream_sizes,
                                                              self.layout.per_step))
        self.global_batch_size = sum(self.layout.per_step)

    def __iter__(self) -> Iterator[list[MicroBatchIndices]]:
        for step in range(self.num_steps):
            slices = []
            for n, q in zip(self.layout.stream_sizes, self.layout.per_step):
                idx = np.arange(step * q, (step + 1) * q)
                slices.append(np.where(idx < n, idx, FILLER))
            yield self.layout.split(slices)

    def __len__(self) -> int:
        return self.num_steps


def micro_batch_counts(kind: str, stream_sizes: Sequence[int], micro_batch_size: int,
                       positive_fraction: Optional[float] = None) -> tuple:
    """Examples per stream in one micro-batch.

    Paired: ``micro_batch_size`` pairs. Unpaired: ``micro_batch_size`` sequences split into
    positives and negatives by ``positive_fraction`` (default: the data's share of positives),
    rounded, with at least one of each.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if kind == "paired":
        return (micro_batch_size,)
    if micro_batch_size < 2:
        raise ValueError("unpaired data needs micro_batch_size >= 2 (at least one positive and "
                         "one negative per micro-batch). Fix: raise micro_batch_size")
    n_pos, n_neg = stream_sizes
    fraction = positive_fraction if positive_fraction is not None else n_pos / (n_pos + n_neg)
    positives = min(max(round(micro_batch_size * fraction), 1), micro_batch_size - 1)
    return (positives, micro_batch_size - positives)


def make_batch_sampler(data, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, *, train: bool = True, seed: int = 0, shuffle: bool = True,
                       positive_fraction: Optional[float] = None):
    """A sampler for ``data`` (a PreferenceData). ``global_batch_size`` and ``micro_batch_size``
    count pairs for paired data and sequences for unpaired data; the global batch must be a
    multiple of ``micro_batch_size * dp_size``."""
    if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size})")
    sizes = [len(s) for s in data.streams]
    counts = micro_batch_counts(data.kind, sizes, micro_batch_size, positive_fraction)
    k = global_batch_size // (micro_batch_size * dp_size)
    if not train:
        return ValidationBatchSampler(sizes, counts, k, dp_rank, dp_size)
    return TrainBatchSampler(sizes, counts, k, dp_rank, dp_size, seed, shuffle, data.source,
                             data.stream_names)
