"""Shared plumbing for tests that run a tiny megatron-core GPTModel in each rank.

Imported inside multi-rank workers, so it imports megatron lazily and never imports nemo.
The step uses plain next-token cross-entropy with per-token normalization (exact across
micro-batches and data-parallel ranks), which is what the layout invariance checks need.
"""

from __future__ import annotations

import torch

from nemo_aot.models.config import GPTModelConfig

TINY = GPTModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, vocab_size=256, make_vocab_size_divisible_by=8,
                      encoder_seq_length=32, max_position_embeddings=64)
GLOBAL_BATCH = 8
SEQ = 16


def global_batch(seed: int = 0, batch: int = GLOBAL_BATCH, seq: int = SEQ, vocab: int = 256):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    loss_mask = (torch.rand(batch, seq, generator=g) > 0.2).float()
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": loss_mask}


def setup(tp=1, pp=1, vpp=None, sp=False, model_cfg=TINY, seed=1234, attention_backend=None,
          per_token_loss=True, peft=None, use_distributed_optimizer=False, config_overrides=None,
          ep=1, etp=None):
    """Initialize megatron parallel state and return DDP-wrapped model chunks for this rank;
    with ``peft`` (a PeftConfig) the chunks carry LoRA adapters and a frozen base;
    ``config_overrides``: more TransformerConfig fields, e.g. recomputation."""
    import dataclasses

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks

    if attention_backend is not None:
        model_cfg = dataclasses.replace(model_cfg, attention_backend=attention_backend)
    parallel = ParallelConfig(tp, pp, vpp, sp, expert_model_parallel_size=ep,
                              expert_tensor_parallel_size=etp)
    initialize_model_parallel(parallel, model_cfg, seed=seed)
    config = to_transformer_config(model_cfg, parallel, calculate_per_token_loss=per_token_loss,
                                   **(config_overrides or {}))
    chunks = build_model_chunks(model_cfg, config, peft=peft, seed=seed)
    if peft is not None and peft.enabled:
        from nemo_aot.models.lora import freeze_base

        freeze_base(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, average_in_collective=False,
        use_distributed_optimizer=use_distributed_optimizer)
    chunks = [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
              for i, c in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return chunks, config


def local_rows(batch, num_microbatches):
    """This DP rank's contiguous share of the global batch, split into micro-batches."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    n = batch["tokens"].shape[0] // dp
    mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    m = n // num_microbatches
    return [{k: v[i * m:(i + 1) * m] for k, v in mine.items()} for i in range(num_microbatches)]


def train_step(chunks, config, batch, num_microbatches=2, forward_only=False):
    """One forward/backward through megatron's schedule; returns (loss_sum, tokens) or None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = local_rows(batch, num_microbatches)
    seq = batch["tokens"].shape[1]

    def iterator():
        yield from micro

    iters = [iterator() for _ in chunks] if len(chunks) > 1 else iterator()

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        pos = torch.arange(seq).unsqueeze(0).expand_as(mb["tokens"])
        out = model(mb["tokens"], pos, None, labels=mb["labels"])

        def loss_func(per_token):
            mask = mb["loss_mask"]
            loss = (per_token.float() * mask).sum()
            tokens = mask.sum().to(torch.int)
            return loss, tokens, {"loss": torch.stack([loss.detach(), tokens.float()])}

        return out, loss_func

    for c in chunks:
        c.zero_grad_buffer()
    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=num_microbatches,
        seq_length=seq, micro_batch_size=micro[0]["tokens"].shape[0], forward_only=forward_only)
    if not stats:
        return None
    total = torch.stack([s["loss"] for s in stats]).sum(0)
    return total


class PreferenceStep:
    """A policy runner and a preference objective, wired as the trainer wires them: the step
    of a ``MegatronGPTAOTModel`` on bare DDP chunks."""

    def __init__(self, chunks, config, vocab_size, padded_vocab_size, alignment):
        from nemo_aot.algorithms.objective import PreferenceObjective
        from nemo_aot.models.policy_runner import PolicyRunner

        self.policy = PolicyRunner(chunks, config, vocab_size, padded_vocab_size,
                                   logprobs_from=alignment.logprobs_from,
                                   logprob_chunk_size=alignment.logprob_chunk_size)
        self.objective = PreferenceObjective(alignment)

    def step(self, micro_batches, forward_only=False, collect_rewards=False):
        return self.objective.step(self.policy, micro_batches, forward_only=forward_only,
                                   collect_rewards=collect_rewards)

    def score(self, micro_batches):
        return self.policy.score(micro_batches)


def sharded_state_dict(chunks):
    if len(chunks) == 1:
        return chunks[0].module.sharded_state_dict()
    return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(chunks)}


def save(chunks, directory):
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_state_dict(chunks), directory)


def load(chunks, directory):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(sharded_state_dict(chunks), directory)
    if len(chunks) == 1:
        chunks[0].module.load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            c.module.load_state_dict(state[f"model{i}"], strict=True)


def grads_into_params(chunks):
    """Overwrite each parameter with its reduced gradient, so a checkpoint saves gradients."""
    with torch.no_grad():
        for c in chunks:
            for p in c.module.parameters():
                if p.requires_grad:  # frozen (LoRA base) weights have no gradient
                    p.copy_(p.main_grad)


def full_state(directory, peft=None, model_cfg=TINY):
    """Canonical full tensors of a checkpoint, read into a TP=1, PP=1 model (1-rank worker)."""
    chunks, _ = setup(peft=peft, model_cfg=model_cfg)
    load(chunks, directory)
    return {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items()
            if not k.endswith("_extra_state")}


def preference_rows(n_chosen, n_rejected, seed, seq=SEQ, vocab=250, paired=False):
    """A micro-batch in nemo_aot.data.collate's layout with random tokens and references."""
    g = torch.Generator().manual_seed(seed)
    rows = n_chosen + n_rejected
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    loss_mask = torch.zeros(rows, seq)
    prompt = torch.randint(3, seq // 2, (rows,), generator=g)
    for i in range(rows):
        loss_mask[i, prompt[i]:] = 1.0
    label = torch.tensor([True] * n_chosen + [False] * n_rejected)
    index = torch.arange(rows) + 1000 * seed
    return {
        "input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask, "position_ids": torch.arange(seq).expand(rows, seq).contiguous(),
        "label": label, "sample_weight": torch.ones(rows),
        "pair_index": torch.arange(rows) % n_chosen if paired else torch.full((rows,), -1),
        "sample_index": index,
        # references near a random model's log-probs, so rewards are O(1) after beta scaling
        "reference_logps": -5.5 * loss_mask.sum(-1) + torch.randn(rows, generator=g) * 3,
    }


def merge_rows(parts, paired=False):
    """Concatenate micro-batches into one, keeping chosen rows before rejected rows."""
    keys = parts[0].keys()
    chosen = {k: torch.cat([p[k][p["label"]] for p in parts]) for k in keys}
    rejected = {k: torch.cat([p[k][~p["label"]] for p in parts]) for k in keys}
    return {k: torch.cat([chosen[k], rejected[k]]) for k in keys}


def nonzero_lora_b(chunks):
    """Fresh adapters have B = 0, which leaves A without gradient: give B values."""
    from nemo_aot.models.lora import adapted_layers

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, _, module in adapted_layers(chunks):
            w = module.adapter.linear_out.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
