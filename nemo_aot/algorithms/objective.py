"""The preference objective: AOT / DPO / IPO (``alignment.*``) on the policy's log-probs, for
every sort scope, outside the model.

The policy (``nemo_aot.models.policy_runner.PolicyRunner``, or the model that holds one) runs
megatron-core's schedule and gives per-sequence log-probs on the last pipeline stage; the
objective gives it the loss callback, the way NeMo-RL's ``policy.train(batch, loss_fn)`` keeps
the loss outside the policy. It declares the data kinds it trains on and its metric names (the
reductions need them on ranks that saw no real sample). The reference log-probs are data: each
micro-batch arrives with ``reference_logps`` attached (``nemo_aot.models.reference``).

Each micro-batch holds chosen and rejected sequences together (``nemo_aot.data.collate``). The
last stage drops filler rows and hands the four log-prob vectors to
``nemo_aot.losses.preference_loss``:

* ``micro``         sort within this micro-batch (TRL's behaviour). The micro-batch loss is
                    returned as is; megatron divides by the number of micro-batches and DDP
                    averages over DP ranks, so the step loss is the mean of micro-batch losses.
* ``data_parallel`` the four vectors are all-gathered over the DP group with autograd and every
                    rank computes the loss of the gathered batch; returned unscaled (the gather's
                    backward sums over ranks, DDP divides by dp: the single-process gradient).
* ``global``        a no-grad forward over all micro-batches collects the transport inputs of
                    the whole global batch (all micro-batches, all DP ranks), sorts them once,
                    then the grad pass returns each micro-batch's matched-partner terms times
                    ``num_microbatches * dp`` (undoing megatron's two averagings), whose sum is
                    the full-batch loss in value and gradient. The grad pass must reproduce the
                    first pass's values (``alignment.reproduce_atol``) or the step fails loudly.

The SFT term (``alignment.sft_loss_weight`` w > 0, ``nemo_aot.losses.sft``) is added outside the
sort, in every scope alike: each micro-batch adds ``w * chosen_nll(its chosen rows' summed
log-probs, N) * num_microbatches * dp``, where N is the step's count of chosen response tokens
over all micro-batches and DP ranks (known on the host, exchanged once per step). Megatron's
division by ``num_microbatches`` and DDP's average over dp leave exactly ``w`` times the NLL of
the whole global batch, a per-token mean over its chosen tokens, in value and gradient.

Metrics are additive sums (``nemo_aot.losses.metrics``, TRL's names) reduced once per step over
micro-batches, DP ranks, and from the last pipeline stage to every rank. The loss's pieces come
from the batch it sorts; ``logits/*`` pieces from this rank's rows of each micro-batch whose loss
has pieces. Under ``length_normalize`` the response token counts travel with the log-probs, so
``rewards/*`` and ``logps/*`` use token sums as TRL's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_aot.distributed.collectives import (
    all_gather_list_with_grad,
    data_parallel_gather,
    exchange_row_counts,
)
from nemo_aot.distributed.parallel import compute_device
from nemo_aot.distributed.ranks import any_rank
from nemo_aot.losses import (
    LOGIT_METRIC_KEYS,
    NLL_METRIC_KEYS,
    chosen_nll,
    finalize_metrics,
    get_loss_spec,
    logit_metric_sums,
    matched_partner_loss,
    nll_metric_sums,
    plan_global_sort,
    preference_loss,
    preference_metric_keys,
    reproduction_error,
    transport_inputs,
)
from nemo_aot.losses.config import AlignmentConfig
from nemo_aot.models.logprobs import document_sums

MicroBatch = dict[str, torch.Tensor]
ROW_KEYS = ("chosen_rows", "rejected_rows")  # added to each micro-batch (host) by the objective


@dataclass
class StepResult:
    """What one global batch gave, the same on every rank."""

    metrics: dict[str, float]
    """Finalized step metrics (TRL's names; {} when the batch held nothing to compare)."""
    sums: dict[str, float]
    """The reduced additive pieces behind ``metrics``: add them over batches, then
    ``finalize_sums`` once, for exact metrics over a whole split."""
    rewards: Optional[dict[str, torch.Tensor]] = field(default=None)
    """Per-sample implicit rewards {chosen, rejected} (host tensors), when collected."""


def side_rows(mb: MicroBatch, paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) row indices of a micro-batch's real rows, computed on the host.

    Paired micro-batches keep row i and row i + B/2 as one pair; a filler pair has weight 0 on
    both rows, so dropping filler rows keeps the pairs aligned. Selecting rows by these index
    tensors (sizes known on the host) needs no device sync, unlike boolean masks on the device.
    """
    real = mb["sample_weight"].cpu() > 0  # host tensors in training: no copy
    if paired:
        half = real.shape[0] // 2
        keep = torch.nonzero(real[:half]).flatten()
        return keep, keep + half
    label = mb["label"].cpu()
    return torch.nonzero(label & real).flatten(), torch.nonzero(~label & real).flatten()


def response_tokens(mb: MicroBatch) -> torch.Tensor:
    """Response tokens per sequence, on the host (packed rows: per document)."""
    mask = mb["loss_mask"].cpu()  # host tensors in training: no copy
    doc_ids = mb.get("doc_ids")
    return document_sums(mask, None if doc_ids is None else doc_ids.cpu(), mb["label"].shape[0])


def split_sides(mb: MicroBatch, values: torch.Tensor, paired: bool):
    """(chosen, rejected) entries of a per-row vector, real rows only (``side_rows``)."""
    if ROW_KEYS[0] in mb:
        chosen, rejected = (mb[k] for k in ROW_KEYS)
    else:  # a micro-batch that did not pass through the objective (e.g. built by hand)
        chosen, rejected = side_rows(mb, paired)
    return (values.index_select(0, chosen.to(values.device)),
            values.index_select(0, rejected.to(values.device)))


def split_rows(mb: MicroBatch, logps: torch.Tensor, paired: bool):
    """(policy chosen, policy rejected, reference chosen, reference rejected), real rows only."""
    ref = mb["reference_logps"].to(device=logps.device, dtype=logps.dtype)
    return (*split_sides(mb, logps, paired), *split_sides(mb, ref, paired))


class PreferenceObjective:
    """The ``alignment`` section's loss on a policy's log-probs, one global batch at a time."""

    def __init__(self, alignment: AlignmentConfig):
        self.alignment = alignment
        spec = get_loss_spec(alignment.loss_type)
        self.paired = spec.paired
        self.data_kinds = spec.data_kinds
        """The data kinds it trains on (``nemo_aot.data.config.DATA_KINDS``)."""
        self.sft_weight = float(alignment.sft_loss_weight)
        # Declared, so that ranks without real samples (validation filler) still join the
        # reductions with the same vector.
        self.metric_keys = sorted([*preference_metric_keys(margins=spec.paired),
                                   *LOGIT_METRIC_KEYS,
                                   *(NLL_METRIC_KEYS if self.sft_weight else ())])

    # ----------------------------------------------------------------- last-stage pieces
    def _loss_logps(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """What the loss sees: token means under ``alignment.length_normalize``, else sums."""
        return sums / counts.clamp(min=1) if self.alignment.length_normalize else sums

    def _lengths(self, mb: MicroBatch, counts: torch.Tensor):
        """(chosen, rejected) token counts, which the loss needs only for averaged log-probs."""
        return split_sides(mb, counts, self.paired) if self.alignment.length_normalize else None

    def _logit_pieces(self, mb: MicroBatch, counts: torch.Tensor, logit_sums: torch.Tensor):
        (sc, sr), (nc, nr) = (split_sides(mb, x.detach(), self.paired)
                              for x in (logit_sums, counts))
        return logit_metric_sums(sc, nc, sr, nr)

    def _sft_share(self, mb: MicroBatch, sums: torch.Tensor, counts: torch.Tensor,
                   sft_tokens: int, scale: int):
        """This micro-batch's share of ``sft_loss_weight * NLL`` times ``scale``
        (``num_microbatches * dp``: megatron's averagings leave the share itself), and its metric
        pieces; ``sums``: per-row summed log-probs, ``sft_tokens``: the step's chosen tokens."""
        (chosen, _), (tokens, _) = (split_sides(mb, x, self.paired) for x in (sums, counts))
        term = chosen_nll(chosen, sft_tokens) * (self.sft_weight * scale)
        return term, nll_metric_sums(chosen, tokens, self.sft_weight)

    def _loss_kwargs(self) -> dict[str, Any]:
        a = self.alignment
        return dict(beta=a.beta, label_smoothing=a.label_smoothing, surrogate=a.surrogate)

    def _scoped_loss(self, pc, pr, rc, rr, lengths=None, dp_rows=None):
        """The loss of this micro-batch's sort group; ``dp_rows``: every DP rank's (chosen,
        rejected) counts of it under the data_parallel scope (exchanged once per step)."""
        a = self.alignment
        lengths = list(lengths or ())
        if dp_rows is not None:
            rows = [[nc, nr, nc, nr] + [nc, nr] * (len(lengths) // 2) for nc, nr in dp_rows]
            pc, pr, rc, rr, *lengths = data_parallel_gather(
                parallel_state.get_data_parallel_group(), rows)([pc, pr, rc, rr, *lengths])
        if pc.numel() == 0 or pr.numel() == 0:
            # Nothing to compare (all filler, or one side only): no loss, no gradient, no
            # metrics; the zero stays in the graph so backward() still runs.
            return (pc.sum() + pr.sum()) * 0, None
        return preference_loss(pc, pr, rc, rr, loss_type=a.loss_type, check_finite=False,
                               lengths=lengths or None, **self._loss_kwargs())

    def _with_rows(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        """The real rows of each side as host index tensors (``side_rows``) in every
        micro-batch (copies of the dicts: the caller's stay as they are)."""
        staged = []
        for mb in micro_batches:
            mb = dict(mb)
            if ROW_KEYS[0] not in mb:
                mb.update(zip(ROW_KEYS, side_rows(mb, self.paired)))
            staged.append(mb)
        return staged

    def _step_counts(self, micro_batches: list[MicroBatch]) -> tuple[Optional[list], int]:
        """What the loss needs from every DP rank, from at most one exchange per step, on the
        last pipeline stage (elsewhere: (None, 0)):

        * under the data_parallel scope, every DP rank's (chosen, rejected) real-row counts per
          micro-batch (the gathers then need no size exchange or host sync), else None;
        * with the SFT term, the step's count of chosen response tokens over all micro-batches
          and DP ranks (from the host loss masks), else 0.
        """
        dp = parallel_state.get_data_parallel_world_size()
        gather_rows = self.alignment.sort_scope == "data_parallel" and dp > 1
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True) or \
                not (gather_rows or self.sft_weight):
            return None, 0
        local = [int(mb[k].numel()) for mb in micro_batches for k in ROW_KEYS] \
            if gather_rows else []
        if self.sft_weight:  # loss masks are host tensors in training: no copy
            local.append(sum(int(response_tokens(mb).index_select(0, mb[ROW_KEYS[0]]).sum())
                             for mb in micro_batches))
        every = exchange_row_counts(local, parallel_state.get_data_parallel_group()) \
            if dp > 1 else [local]
        rows = [[(counts[2 * i], counts[2 * i + 1]) for counts in every]
                for i in range(len(micro_batches))] if gather_rows else None
        return rows, sum(counts[-1] for counts in every) if self.sft_weight else 0

    def step(self, policy, micro_batches: list[MicroBatch], forward_only: bool = False,
             collect_rewards: bool = False) -> StepResult:
        """Forward (and backward unless ``forward_only``) of one global batch. With
        ``collect_rewards`` (validation: the reward CDF plots) the per-sample rewards come back
        too, gathered over DP ranks (one host copy per micro-batch)."""
        rewards = [] if collect_rewards else None
        micro_batches = self._with_rows(micro_batches)
        dp_rows, sft_tokens = self._step_counts(micro_batches)
        if self.alignment.sort_scope == "global":
            return self._global_step(policy, micro_batches, forward_only, rewards, sft_tokens)
        scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()

        def loss_for(index, mb, output):
            sums, counts, logit_sums = policy.sequence_logps(output, mb, with_logits=True)
            rows = split_rows(mb, self._loss_logps(sums, counts), self.paired)
            if rewards is not None:
                rewards.append(self._sample_rewards(rows))
            loss, pieces = self._scoped_loss(*rows, lengths=self._lengths(mb, counts),
                                             dp_rows=None if dp_rows is None else dp_rows[index])
            if pieces is not None:
                pieces.update(self._logit_pieces(mb, counts, logit_sums))
            if self.sft_weight:  # outside the sort: this rank's own chosen rows
                term, nll_pieces = self._sft_share(mb, sums, counts, sft_tokens, scale)
                loss = loss + term
                pieces = {**(pieces or {}), **nll_pieces}
            if pieces is not None:
                # megatron divides the returned loss in place; the pieces must not share it
                pieces = {k: v.detach().clone() for k, v in pieces.items()}
            return loss, {"sums": pieces}

        stats = policy.forward_backward(micro_batches, loss_for, forward_only)
        return self._reduce_metrics([s["sums"] for s in stats], rewards)

    def _sample_rewards(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        pc, pr, rc, rr = (t.detach().double().cpu() for t in rows)
        return self.alignment.beta * (pc - rc), self.alignment.beta * (pr - rr)

    # ----------------------------------------------------------------- global scope
    def _global_step(self, policy, micro_batches, forward_only, rewards: Optional[list],
                     sft_tokens: int):
        a = self.alignment
        captured: list[tuple] = []
        scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()

        def first_pass(index, mb, output):
            sums, counts, logit_sums = policy.sequence_logps(output, mb, with_logits=True)
            rows = split_rows(mb, self._loss_logps(sums, counts).detach(), self.paired)
            pieces = self._logit_pieces(mb, counts, logit_sums)
            if self.sft_weight:  # this rank's own pieces, like logits/*
                pieces.update(self._sft_share(mb, sums.detach(), counts, sft_tokens, scale)[1])
            captured.append((rows, self._lengths(mb, counts), pieces))
            if rewards is not None:
                rewards.append(self._sample_rewards(rows))
            return sums.sum() * 0, {}

        with torch.no_grad():
            policy.forward_backward(micro_batches, first_pass, forward_only=True)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        plan = offsets = None
        sums = []
        if last_stage:
            plan, offsets, sums = self._plan(captured)
        if forward_only:
            return self._reduce_metrics(sums, rewards)
        errors = []

        def grad_pass(index, mb, output):
            sums, counts, _ = policy.sequence_logps(output, mb)
            loss = sums.sum() * 0
            if self.sft_weight:  # outside the sort, as in the other scopes
                loss = loss + self._sft_share(mb, sums, counts, sft_tokens, scale)[0]
            if plan is None:
                return loss, {}
            logps = self._loss_logps(sums, counts)
            u, v = transport_inputs(a.loss_type, *split_rows(mb, logps, self.paired))
            (u0, v0) = offsets[index]
            u_index = torch.arange(u0, u0 + u.numel(), device=u.device)
            v_index = torch.arange(v0, v0 + v.numel(), device=v.device)
            errors.append(reproduction_error(u, v, u_index, v_index, plan))
            term = matched_partner_loss(u, v, u_index, v_index, plan, reproduce_atol=None,
                                        **self._loss_kwargs())
            return loss + term * scale, {}

        policy.forward_backward(micro_batches, grad_pass, forward_only=False)
        self._check_reproduced(errors)
        return self._reduce_metrics(sums, rewards)

    def _check_reproduced(self, errors: list[torch.Tensor]) -> None:
        """The grad pass must reproduce the first pass's values: one check per step, agreed by
        every rank (the last stage measures; all ranks raise together)."""
        atol = self.alignment.reproduce_atol
        worst = float(torch.stack(errors).max()) if errors else 0.0  # the step's one host read
        if any_rank(worst > atol):
            raise RuntimeError(
                f"global sort scope: the grad pass's values differ from the first pass's by "
                f"{worst:.3g} (on this rank) > alignment.reproduce_atol={atol}: the forward is "
                "not deterministic (dropout on? FP8 delayed scaling?)")

    def _plan(self, captured):
        """Gather every rank's first-pass transport inputs in rank-major order and sort them.

        Returns (plan, per-micro-batch offsets, [metric pieces]): the loss's pieces of the
        gathered batch and this rank's ``logits/*`` pieces.
        """
        a = self.alignment
        us, vs, columns = [], [], []
        for rows, lengths, _ in captured:
            u, v = transport_inputs(a.loss_type, *rows)
            us.append(u)
            vs.append(v)
            columns.append([*rows, *(lengths or ())])
        local = [torch.cat(us), torch.cat(vs)] + [torch.cat(c) for c in zip(*columns)]
        group = parallel_state.get_data_parallel_group()
        dp_rank = parallel_state.get_data_parallel_rank()
        if parallel_state.get_data_parallel_world_size() > 1:
            # One exchange of every gathered tensor's length serves the offsets and the gather.
            rows = exchange_row_counts([t.shape[0] for t in local], group)
            base = [sum(r[0] for r in rows[:dp_rank]), sum(r[1] for r in rows[:dp_rank])]
            local = all_gather_list_with_grad(local, group, rows=rows)
        else:
            base = [0, 0]
        u_all, v_all, pc, pr, rc, rr, *lengths = local
        if u_all.numel() == 0 or v_all.numel() == 0:
            # No sort possible (e.g. a validation batch of negatives only): as in the other
            # scopes, the batch adds no loss, no gradient and no metrics.
            return None, None, [None]
        plan = plan_global_sort(u_all, v_all)
        offsets, (u0, v0) = [], base
        for u, v in zip(us, vs):
            offsets.append((u0, v0))
            u0, v0 = u0 + u.numel(), v0 + v.numel()
        _, metric_sums = preference_loss(pc, pr, rc, rr, loss_type=a.loss_type,
                                         check_finite=False, lengths=lengths or None,
                                         **self._loss_kwargs())
        for _, _, pieces in captured:  # this rank's logits/* pieces, summed over DP later
            for k, v in pieces.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
        return plan, offsets, [metric_sums]

    # ----------------------------------------------------------------- metrics
    def _reduce_metrics(self, sums: list[Optional[dict]], rewards: Optional[list]) -> StepResult:
        """Sum over micro-batches and DP ranks on the last stage; share with every rank.

        Pieces of a batch every DP rank sees (data_parallel and global scopes) are counted dp
        times, numerators and denominators alike, so the finalized values stay exact. Collected
        per-sample ``rewards`` (this rank's, per micro-batch) are gathered over DP ranks.
        """
        keys = self.metric_keys
        payload = None
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            # Accumulate on the device and copy to the host once per step (no per-value syncs).
            vec = torch.zeros(len(keys), dtype=torch.float64, device=compute_device())
            zero = vec.new_zeros(())
            for s in sums:
                if s is not None:  # None: an all-filler micro-batch contributes nothing
                    # a micro-batch with nothing to sort may still hold the SFT term's pieces
                    vec += torch.stack([s[k].detach().double().to(vec.device) if k in s else zero
                                        for k in keys])
            dp_group = parallel_state.get_data_parallel_group()
            if parallel_state.get_data_parallel_world_size() > 1:
                dist.all_reduce(vec, group=dp_group)
            gathered = None
            if rewards is not None:
                local = [torch.cat(x) for x in zip(*rewards)] if rewards else \
                    [torch.zeros(0), torch.zeros(0)]  # deliberate host tensors (plot data)
                if parallel_state.get_data_parallel_world_size() > 1:
                    box = [None] * parallel_state.get_data_parallel_world_size()
                    dist.all_gather_object(box, local, group=dp_group)
                    local = [torch.cat([b[i] for b in box]) for i in range(2)]
                gathered = {"chosen": local[0], "rejected": local[1]}
            payload = (dict(zip(keys, vec.tolist())), gathered)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [payload]
            dist.broadcast_object_list(
                box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
            payload = box[0]
        reduced, gathered = payload
        return StepResult(finalize_sums(reduced), reduced, gathered)


def finalize_sums(sums: dict[str, float]) -> dict[str, float]:
    """Logged metrics from reduced additive pieces ({} when nothing real was seen)."""
    if not sums or sums.get("calls", 0.0) <= 0:
        return {}
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in sums.items()}
    return {k: float(v) for k, v in finalize_metrics(tensors).items()}


__all__ = ["PreferenceObjective", "StepResult", "finalize_sums", "side_rows", "split_rows",
           "split_sides", "response_tokens", "ROW_KEYS"]
