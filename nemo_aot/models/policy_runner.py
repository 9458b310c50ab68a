"""The policy's forward machinery: megatron-core's schedule over a step's micro-batches, and
per-sequence log-probs from what the last pipeline stage outputs.

``PolicyRunner`` knows nothing of a loss. An objective (``nemo_aot.algorithms.objective``, the
SFT objective) hands ``forward_backward`` a ``loss_for(index, micro_batch, output)`` callback
that megatron calls on the last stage, where ``sequence_logps`` turns ``output`` - the final
hidden states (``logprobs_from=hidden_states``) or the vocab-parallel logits - into each row's
summed response log-prob and token count. The same code scores the reference (``score``), so at
step 0 policy and reference log-probs are bitwise equal.

Micro-batches are dicts in ``nemo_aot.data.collate``'s layout; they stay on the host until the
schedule copies each to the compute device (from page-locked memory on a GPU host, so the copies
overlap).
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_aot.distributed.parallel import compute_device
from nemo_aot.losses.config import LOGPROBS_FROM
from nemo_aot.models.gpt import emit_hidden_states, output_weight
from nemo_aot.models.layer_specs import document_attention_mask
from nemo_aot.models.logprobs import (
    document_sums,
    hidden_state_logprobs,
    sequence_logprobs,
    tp_vocab_range,
    vocab_parallel_logprobs,
)

MicroBatch = dict[str, torch.Tensor]
# loss_for(index of the micro-batch in the step, the micro-batch on the device, last-stage
# output) -> (loss, stats): megatron's loss_func, with the micro-batch it belongs to
LossFor = Callable[[int, MicroBatch, torch.Tensor], tuple]


class PolicyRunner:
    """Forward(/backward) of one global batch of the policy's chunks (megatron DDP modules)."""

    def __init__(self, chunks: list, transformer_config, vocab_size: int, padded_vocab_size: int,
                 logprobs_from: str = "hidden_states", logprob_chunk_size: int = 1024):
        if logprobs_from not in LOGPROBS_FROM:
            raise ValueError(f"logprobs_from must be one of {list(LOGPROBS_FROM)}, got "
                             f"{logprobs_from!r}")
        self.chunks = chunks
        self.config = transformer_config
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.from_hidden = logprobs_from == "hidden_states"
        self.chunk_tokens = logprob_chunk_size
        self.moe = bool(getattr(transformer_config, "num_moe_experts", None))

    def sync_params(self) -> None:
        """Finish the parameter all-gather that overlap_param_gather defers to the next forward
        (collective). Code that reads the weights without a forward (checkpoint, export, the
        cpu_swap reference) calls it first; a forward gathers through megatron's pre-hooks."""
        for chunk in self.chunks:
            if chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)

    # ----------------------------------------------------------------- last-stage log-probs
    def token_logprobs(self, output: torch.Tensor, labels: torch.Tensor,
                       with_logits: bool = False):
        """Per-token log-probs of ``labels`` ([b, s], fp32) from the last stage's ``output``;
        with ``with_logits`` also each position's mean logit over the vocabulary."""
        start, group = tp_vocab_range(self.padded_vocab_size)
        kwargs = dict(vocab_size=self.vocab_size, vocab_start=start, group=group,
                      chunk_tokens=self.chunk_tokens, mean_logits=with_logits)
        if self.from_hidden:
            return hidden_state_logprobs(output, output_weight(self.chunks[-1]), labels, **kwargs)
        return vocab_parallel_logprobs(output, labels, **kwargs)

    def sequence_logps(self, output: torch.Tensor, mb: MicroBatch, with_logits: bool = False):
        """Per row: (log-prob summed over the response tokens, token count, sum over the
        response tokens of the mean logit over the vocabulary, or None without
        ``with_logits``). Packed rows (``doc_ids``) give one entry per document."""
        out = self.token_logprobs(output, mb["labels"], with_logits)
        token_logps, mean_logits = out if with_logits else (out, None)
        docs = dict(doc_ids=mb.get("doc_ids"), num_docs=mb["label"].shape[0])
        logps, counts = sequence_logprobs(token_logps, mb["loss_mask"], **docs)
        logit_sums = None if mean_logits is None else \
            document_sums(mean_logits * mb["loss_mask"].to(mean_logits.dtype), **docs)
        return logps, counts, logit_sums

    # ----------------------------------------------------------------- schedule
    def padding_mask(self, model, mb: MicroBatch):
        """[b, s] bool, True at padding positions (None for a micro-batch that says nothing of
        padding: neither ``doc_ids`` nor ``seq_lengths``): the router of a mixture-of-experts model
        leaves them out of its load-balancing and z losses. Without it the padding - which the
        layout chooses (sequence parallelism's pad_to_multiple_of, pipeline parallelism's
        uniform step length) - would enter the router losses and their gradients. megatron
        scatters the mask over the sequence-parallel ranks on the first pipeline stage only:
        later stages get it scattered here."""
        from megatron.core import tensor_parallel
        from megatron.core.utils import get_attr_wrapped_model

        ids = mb["input_ids"]
        if "doc_ids" in mb:
            padding = mb["doc_ids"] < 0
        elif "seq_lengths" not in mb:
            return None
        else:
            positions = torch.arange(ids.shape[1], device=ids.device)
            padding = positions.unsqueeze(0) >= mb["seq_lengths"].to(ids.device).unsqueeze(1)
        if self.config.sequence_parallel and not get_attr_wrapped_model(model, "pre_process"):
            padding = tensor_parallel.scatter_to_sequence_parallel_region(
                padding.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
        return padding

    def forward_backward(self, micro_batches: list[MicroBatch], loss_for: LossFor,
                         forward_only: bool) -> list:
        """megatron's forward_backward_func over ``micro_batches``; ``loss_for`` runs on the
        last stage. Returns megatron's per-micro-batch stats (empty off the last stage)."""
        seq = micro_batches[0]["input_ids"].shape[1]
        if any(mb["input_ids"].shape[1] != seq for mb in micro_batches) and \
                parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("pipeline parallelism needs every micro-batch of a step padded to one "
                             "length: set data.uniform_step_length=true")
        micro_batches = self._pinned(micro_batches)
        device = compute_device()

        def forward_step(data_iterator, model):
            index, mb = next(data_iterator)
            mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                  for k, v in mb.items()}
            mask = document_attention_mask(mb["doc_ids"]) if "doc_ids" in mb else None
            padding = self.padding_mask(model, mb) if self.moe else None
            extra = {} if padding is None else {"padding_mask": padding}
            with emit_hidden_states(model, on=self.from_hidden):
                output = model(mb["input_ids"], mb["position_ids"], mask, **extra)
            return output, lambda out: loss_for(index, mb, out)

        def iterator():
            yield from enumerate(micro_batches)

        many = len(self.chunks) > 1
        if not forward_only:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iterator() for _ in self.chunks] if many else iterator(),
            model=self.chunks if many else self.chunks[0],
            num_microbatches=len(micro_batches), seq_length=seq,
            micro_batch_size=micro_batches[0]["input_ids"].shape[0], forward_only=forward_only)

    @staticmethod
    def _pinned(micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        """Page-locked copies on a GPU host, so that the ``non_blocking`` copies in the schedule
        overlap (from pageable memory they do not); the micro-batches as they are elsewhere."""
        if compute_device().type != "cuda":
            return micro_batches
        return [{k: v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v
                 for k, v in mb.items()} for mb in micro_batches]

    def score(self, micro_batches: list[MicroBatch]) -> list[tuple[torch.Tensor, ...]]:
        """Per micro-batch (label, sample_index, summed log-prob, token count) on the last stage
        (always token sums: a reference cache is normalized where it is used)."""

        def loss_for(index, mb, output):
            logps, counts, _ = self.sequence_logps(output, mb)
            return logps.sum() * 0, {"scores": (mb["label"], mb["sample_index"], logps.detach(),
                                                counts)}

        with torch.no_grad():
            stats = self.forward_backward(micro_batches, loss_for, forward_only=True)
        return [s["scores"] for s in stats]


__all__ = ["PolicyRunner", "MicroBatch", "LossFor"]
