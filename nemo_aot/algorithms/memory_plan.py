"""A memory plan before launch: per-GPU bytes of a resolved run, from its config alone.

``nemo-aot train ... --plan [--gpu-memory-gib 80]`` prints, for the heaviest pipeline stage of the
layout, what megatron-core will hold (counted as megatron's theoretical-memory report counts it,
for this project's model and step):

* weights: the stage's parameters (TP-sharded matrices / tp, replicated norms, the embedding on
  the first stage, the output layer on the last, LoRA adapters) in the training dtype;
* gradients: megatron DDP's fp32 buffer (``grad_reduce_in_fp32``) for the trained parameters;
* optimizer: Adam's two fp32 moments, plus fp32 main weights for bf16/fp16 training, split over
  the data-parallel ranks by the distributed optimizer;
* activations of one micro-batch per layer, saved for backward (Llama layer: norms, QKV,
  attention output and its fp32 log-sum-exp, SwiGLU input and output; SDPA's flash kernel keeps
  no [s, s] scores), times the micro-batches a 1F1B pipeline keeps in flight on its first stage,
  with and without the configured recomputation; a Gated DeltaNet layer (model.linear_attention)
  instead saves its projections, the causal convolution's input and output (the conv buffers)
  and, on the torch gated-delta path, fp32 copies, the per-chunk transforms and one recurrent
  state [heads, key_dim, value_dim] per 64-token chunk (fla recomputes those states: less);
* mixture-of-experts layers: the router (replicated), this rank's num_moe_experts / EP experts
  (split by ETP) and the shared expert; the experts' optimizer state is split over the
  expert-data-parallel ranks (world / (ETP x EP x PP)) by the distributed optimizer; their
  activations assume balanced routing (each token's top-k copies), plus the token dispatcher's
  buffers for one layer (all-to-all: the permuted tokens sent and received; all-gather: the
  hidden states of the whole EP x TP group);
* the log-prob workspace on the last stage: the final hidden states, a few fp32 [chunk, V/tp]
  chunks and, from hidden states, the fp32 output-weight gradient buffer (with
  ``alignment.logprobs_from=logits`` the model's [tokens, V/tp] logits instead).

It then solves for the largest ``trainer.micro_batch_size`` whose total fits the given GPU
memory after a reserve for the CUDA context, NCCL and allocator fragmentation. Estimates, not
measurements: ``tests/unit/test_memory_plan.py`` holds them to measured peaks on CPU (25%).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

GIB = 2 ** 30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RESERVE_GIB = 4.0
"""Set aside on a GPU: CUDA context, NCCL buffers, cuBLAS workspaces, fragmentation."""
WORKSPACE_CHUNKS = 3
"""fp32 [chunk, V/tp] temporaries alive at once in the log-prob kernel (logits, exp, grad)."""


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per GPU on the heaviest pipeline stage."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    """Saved for backward, all micro-batches in flight, with the configured recomputation."""
    recompute_workspace: int
    """Full recomputation: one recomputed group's activations during its backward."""
    activations_no_recompute: int
    activations_full_recompute: int
    """With full recomputation of every layer (each layer's input kept, one layer's
    activations rebuilt at a time): kept + rebuilt."""
    logprob_workspace: int
    """Alive at the start of backward, before any layer is recomputed."""
    trained_params: int
    stage_params: int
    per_micro_batch: int
    """What one more sample per micro-batch adds (activations and workspace)."""
    dispatcher: int = 0
    """Mixture of experts: one layer's token dispatcher buffers (transient)."""
    expert_params: int = 0
    """Mixture of experts: this rank's routed-expert parameters on the heaviest stage."""
    linear_attention_state: int = 0
    """Of the activations without recomputation: Gated DeltaNet recurrent states and conv
    buffers (0 without linear attention)."""

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations + max(self.logprob_workspace,
                                                    self.recompute_workspace) + self.dispatcher


def _layer_params(m, tp: int) -> tuple[int, int]:
    """(sharded, replicated) parameters of one transformer layer on one TP rank, without the
    routed experts of a mixture-of-experts layer (``_expert_params``)."""
    d, nq = m.head_dim, m.num_attention_heads
    nkv = m.num_query_groups or nq
    h, f = m.hidden_size, m.ffn_hidden_size
    qkv = h * (nq + 2 * nkv) * d + ((nq + 2 * nkv) * d if m.qkv_bias or m.bias else 0)
    replicated = 2 * h + (2 * d if getattr(m, "qk_layernorm", False) else 0)
    if getattr(m, "num_moe_experts", None) is None:
        return (qkv + nq * d * h + 3 * h * f) // tp, replicated
    shared = m.moe_shared_expert_intermediate_size or 0
    replicated += m.num_moe_experts * h + (h if m.moe_shared_expert_gate else 0)  # router, gate
    return (qkv + nq * d * h + 3 * h * shared) // tp, replicated


def _expert_params(m, p) -> int:
    """Routed-expert parameters of one layer on one rank: num_moe_experts / EP SwiGLU experts,
    each split over ETP."""
    if getattr(m, "num_moe_experts", None) is None:
        return 0
    local = m.num_moe_experts // p.expert_model_parallel_size
    return local * 3 * m.hidden_size * m.expert_ffn_hidden_size // p.expert_tensor


def _gdn_dims(m) -> tuple[int, int, int, int, int]:
    """(q/k width, value width, value heads, key head dim, value head dim) of a GDN layer."""
    la = m.linear_attention
    return (la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim,
            la.num_value_heads, la.key_head_dim, la.value_head_dim)


def _layer_kinds(m) -> list[int]:
    """Per layer 1 = Gated DeltaNet, 0 = softmax attention."""
    la = m.linear_attention
    return la.pattern(m.num_layers) if la is not None else [0] * m.num_layers


def _hybrid_layer_params(m, tp: int, linear: bool) -> tuple[int, int]:
    """(sharded, replicated) parameters of one layer of a linear-attention model, without the
    routed experts of a mixture-of-experts MLP (``_expert_params``)."""
    h, f, d, nq = m.hidden_size, m.ffn_hidden_size, m.head_dim, m.num_attention_heads
    mlp, moe = h * 2 * f + f * h, 0
    if getattr(m, "num_moe_experts", None) is not None:  # shared expert; router and its gate
        mlp = 3 * h * (m.moe_shared_expert_intermediate_size or 0)
        moe = m.num_moe_experts * h + (h if m.moe_shared_expert_gate else 0)
    if linear:
        qk, v, nv, _, dv = _gdn_dims(m)
        conv = (2 * qk + v) * m.linear_attention.conv_kernel_dim
        return ((h * (2 * qk + 2 * v + 2 * nv) + conv + 2 * nv + v * h + mlp) // tp,
                2 * h + dv + moe)
    nkv = m.num_query_groups or nq
    q = nq * d * (2 if m.attention_output_gate else 1)
    norms = 2 * d if m.qk_layernorm else 0
    return (h * (q + 2 * nkv * d) + nq * d * h + mlp) // tp, 2 * h + norms + moe


def _stage_layer_params(m, p) -> int:
    """Layer parameters of the heaviest pipeline stage on one TP rank."""
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    layers = -(-m.num_layers // pp)
    if m.linear_attention is None:
        sharded, replicated = _layer_params(m, tp)
        return layers * (sharded + _expert_params(m, p) + replicated)
    experts = _expert_params(m, p)
    per_layer = [sum(_hybrid_layer_params(m, tp, bool(k))) + experts for k in _layer_kinds(m)]
    return max(sum(per_layer[i:i + layers]) for i in range(0, m.num_layers, layers))


def gdn_layer_activation_bytes(cfg, tokens: int, rows: int) -> tuple[int, int]:
    """(all, recurrent states + conv buffers) bytes a Gated DeltaNet layer saves for backward
    over ``tokens`` tokens in ``rows`` sequences on one TP rank, on the torch gated-delta path
    (an upper estimate where fla runs). Per token: in TP, the in_proj output, the conv input and
    output (conv buffers), the l2-normed and head-repeated q/k, fp32 copies of q/k/v/g/beta, the
    UT-transformed values and keys, three chunk-square matrices (C per token), the fp32 output,
    the gated norm's input and gate, the out_proj input and five ffn-sized SwiGLU tensors (a
    mixture of experts: as ``layer_activation_bytes`` counts it); outside it, the 6
    hidden-sized norm/residual tensors; and per 64-token chunk of a sequence one fp32
    recurrent state [value heads, key dim, value dim]."""
    from nemo_aot.models.gdn_kernels import DEFAULT_CHUNK_SIZE as C

    m, p = cfg.model, cfg.parallel
    tp, act = p.tensor_model_parallel_size, DTYPE_BYTES[cfg.precision.precision]
    sp = tp if p.sequence_parallel else 1
    qk, v, nv, dk, dv = _gdn_dims(m)
    conv = 2 * (2 * qk + v) * act
    kernel = (6 * nv * dk + 4 * v + 2 * nv) * 4 + 6 * nv * C * 4  # fp32, chunk squares
    gated_norm = 5 * v * 4 + 2 * v * act
    mlp, moe = _mlp_activation(m, act)
    sharded = ((2 * qk + 2 * v + 2 * nv) * act + conv + 2 * qk * act + 2 * nv * dk * act
               + kernel + gated_norm + mlp)
    chunks = rows * -(-(tokens // max(rows, 1)) // C)
    states = chunks * nv * dk * dv * 4 // tp
    whole = tokens * ((6 * m.hidden_size * act + moe) // sp + sharded // tp) + states
    return whole, states + tokens * conv // tp


def _adapter_params(m, peft, tp: int) -> int:
    """LoRA parameters of one layer on one TP rank (column base: B sharded, row base: A)."""
    if peft is None or not peft.enabled:
        return 0
    d, nq, h, f, r = m.head_dim, m.num_attention_heads, m.hidden_size, m.ffn_hidden_size, \
        peft.rank
    nkv = m.num_query_groups or nq
    shapes = {"linear_qkv": (h, (nq + 2 * nkv) * d, "column"), "linear_fc1": (h, 2 * f, "column"),
              "linear_proj": (nq * d, h, "row"), "linear_fc2": (f, h, "row")}
    total = 0
    for target in peft.target_modules:
        fan_in, fan_out, kind = shapes[target]
        total += r * fan_in + r * fan_out // tp if kind == "column" else \
            r * fan_in // tp + r * fan_out
    return total


def stage_expert_params(cfg) -> int:
    """Routed-expert parameters of the heaviest pipeline stage on one rank."""
    layers = -(-cfg.model.num_layers // cfg.parallel.pipeline_model_parallel_size)
    return layers * _expert_params(cfg.model, cfg.parallel)


def stage_params(cfg) -> tuple[int, int]:
    """(all parameters, trained parameters) of the heaviest pipeline stage on one rank."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    adapters = _adapter_params(m, cfg.peft, tp)
    layers = -(-m.num_layers // pp)
    vocab = m.padded_vocab_size(tp) // tp * m.hidden_size
    first = vocab
    last = m.hidden_size + (0 if m.share_embeddings_and_output_weights and pp == 1 else vocab)
    ends = first + last if pp == 1 else max(first, last)
    base = _stage_layer_params(m, p) + ends
    lora = layers * adapters
    trained = lora if cfg.peft.enabled else base
    return base + lora, trained


def _rows(cfg, micro_batch_size: int) -> int:
    """Sequences per micro-batch: a pair is two (paired data), an unpaired sample one. With
    ``data.format=auto`` pairs are assumed (the larger of the two)."""
    unpaired = cfg.data.kind == "unpaired"
    return micro_batch_size * (1 if unpaired else 2)


def layer_activation_bytes(cfg, tokens: int) -> int:
    """Bytes one transformer layer saves for backward over ``tokens`` tokens on one TP rank.

    Counted from the tensors autograd saves in this project's layer (local spec, SDPA, torch
    RMSNorm and SwiGLU; ``tests/unit/test_memory_plan.py`` holds the count to a
    ``saved_tensors_hooks`` measurement): per token, 6 hidden-sized tensors outside the TP
    region (the two norms' inputs and outputs and the residual stream; split by sequence
    parallelism), and inside it the QKV output and SDPA's copy of it, the rotated queries and the
    attention output, the attention log-sum-exp (fp32), and five ffn-sized SwiGLU tensors (the
    fc1 output is two of them). TE's fused layers save less; this is the upper estimate there."""
    m, p = cfg.model, cfg.parallel
    tp, act = p.tensor_model_parallel_size, DTYPE_BYTES[cfg.precision.precision]
    sp = tp if p.sequence_parallel else 1
    d, nq, h = m.head_dim, m.num_attention_heads, m.hidden_size
    nkv = m.num_query_groups or nq
    replicated = 6 * h * act
    attention = (2 * nq * d) * act + nq * 4
    mlp, moe = _mlp_activation(m, act)
    replicated += moe
    sharded = (2 * (nq + 2 * nkv) * d) * act + mlp + attention
    if getattr(m, "qk_layernorm", False):  # the query/key norms' inputs and outputs
        sharded += 2 * (nq + nkv) * d * act
    if getattr(m, "post_sublayer_norms", False):  # two more norms' inputs and outputs (Gemma)
        replicated += 4 * h * act
    perf = cfg.performance
    if perf.recompute_granularity == "selective":
        if "core_attn" in perf.recompute_modules:
            sharded -= attention  # only its inputs stay: the QKV output
        if "mlp" in perf.recompute_modules:
            sharded -= mlp
            replicated -= h * act
    return tokens * (replicated // sp + sharded // tp)


def _mlp_activation(m, act: int) -> tuple[int, int]:
    """(in the TP region, outside it) bytes per token one layer's MLP saves for backward."""
    if getattr(m, "num_moe_experts", None) is None:
        return 5 * m.ffn_hidden_size * act, 0
    # balanced routing: top-k copies of each token through experts of width moe_ffn (split by
    # ETP, counted as TP here), the permuted tokens in and out, fp32 router logits and
    # probabilities, the shared expert
    k, fe = m.moe_router_topk, m.expert_ffn_hidden_size
    return ((k * 5 * fe + 5 * (m.moe_shared_expert_intermediate_size or 0)) * act,
            2 * k * m.hidden_size * act + 2 * m.num_moe_experts * 4)


def _in_flight(cfg, num_microbatches: int) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once (1F1B), scaled
    for the interleaved schedule as megatron's report scales it."""
    p = cfg.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if pp == 1:
        return 1.0
    flight = min(pp, num_microbatches)
    return flight * (1 + (pp - 1) / (pp * vpp)) if vpp else flight


def activation_bytes(cfg, micro_batch_size: int, num_microbatches: int,
                     recompute: Optional[str] = "configured") -> tuple[int, int]:
    """(kept, transient) activation bytes of the first pipeline stage: kept for backward over
    all micro-batches in flight, and, under full recomputation, one recomputed group's
    activations during its backward (0 otherwise). ``recompute``: "configured"
    (cfg.performance), None (none) or "full" (every layer, uniform, 1 per group)."""
    m, p, perf = cfg.model, cfg.parallel, cfg.performance
    tokens = _rows(cfg, micro_batch_size) * cfg.data.max_seq_length
    layers = -(-m.num_layers // p.pipeline_model_parallel_size)
    sp = p.tensor_model_parallel_size if p.sequence_parallel else 1
    layer_input = tokens * m.hidden_size * DTYPE_BYTES[cfg.precision.precision] // sp
    if recompute == "configured":
        mode, method, group = (perf.recompute_granularity, perf.recompute_method,
                               perf.recompute_num_layers or 1)
    else:
        mode, method, group = recompute, "uniform", 1
    plain = dataclasses.replace(cfg, performance=dataclasses.replace(
        perf, recompute_granularity=None))
    whole_layer = layer_activation_bytes(cfg if mode == "selective" else plain, tokens)
    kinds = _layer_kinds(m)[:layers]  # the first stage's layers
    if 1 in kinds:  # Gated DeltaNet layers save other tensors than attention layers
        gdn = gdn_layer_activation_bytes(cfg, tokens, _rows(cfg, micro_batch_size))[0]
        per_layer = [gdn if k else whole_layer for k in kinds]
    else:
        per_layer = [whole_layer] * layers
    if mode == "full":
        if method == "block":
            stored = min(group, layers) * layer_input + sum(per_layer[group:])
        else:
            stored = -(-layers // group) * layer_input
        transient = min(group, layers) * max(per_layer)  # a recomputed group, in backward
    else:
        stored, transient = sum(per_layer) + layer_input, 0
    return int(stored * _in_flight(cfg, num_microbatches)), int(transient)


def logprob_workspace_bytes(cfg, micro_batch_size: int) -> int:
    """The last stage's log-prob working set for one micro-batch (see the module docstring)."""
    m, p, a = cfg.model, cfg.parallel, cfg.alignment
    tp = p.tensor_model_parallel_size
    tokens = _rows(cfg, micro_batch_size) * cfg.data.max_seq_length
    local_vocab = m.padded_vocab_size(tp) // tp
    act = DTYPE_BYTES[cfg.precision.precision]
    chunks = WORKSPACE_CHUNKS * min(a.logprob_chunk_size, tokens) * local_vocab * 4
    if a.logprobs_from == "logits":
        return tokens * local_vocab * act + chunks
    hidden = tokens * m.hidden_size * act
    trained_head = not cfg.peft.enabled
    return hidden + chunks + (local_vocab * m.hidden_size * 4 if trained_head else 0)


def dispatcher_bytes(cfg, micro_batch_size: int) -> int:
    """One MoE layer's token dispatcher buffers on one rank (0 for a dense model)."""
    m, p = cfg.model, cfg.parallel
    if getattr(m, "num_moe_experts", None) is None:
        return 0
    act = DTYPE_BYTES[cfg.precision.precision]
    sp = p.tensor_model_parallel_size if p.sequence_parallel else 1
    tokens = _rows(cfg, micro_batch_size) * cfg.data.max_seq_length // sp
    if m.moe_token_dispatcher_type == "allgather":
        group = p.expert_model_parallel_size * p.tensor_model_parallel_size
        return 2 * tokens * group * m.hidden_size * act
    return 2 * 2 * m.moe_router_topk * tokens * m.hidden_size * act  # sent + received, fwd + bwd


def memory_plan(cfg, world_size: int, micro_batch_size: Optional[int] = None) -> MemoryPlan:
    """The plan for ``cfg`` at ``world_size`` ranks (micro-batch: cfg's unless given)."""
    mbs = micro_batch_size or cfg.trainer.micro_batch_size
    dp = cfg.parallel.data_parallel_size(world_size)
    num_microbatches = max(cfg.trainer.global_batch_size // (cfg.trainer.micro_batch_size * dp), 1)
    params, trained = stage_params(cfg)
    experts = 0 if cfg.peft.enabled else stage_expert_params(cfg)
    precision = cfg.precision.precision
    weights = params * DTYPE_BYTES[precision]
    gradients = trained * 4
    per_param = 8 + (0 if precision == "fp32" else 4)
    optimizer = (trained - experts) * per_param
    expert_optimizer = experts * per_param
    if cfg.optim.use_distributed_optimizer:
        optimizer //= dp
        expert_optimizer //= max(cfg.parallel.expert_data_parallel_size(world_size), 1)
    optimizer += expert_optimizer
    activations, rebuilt = activation_bytes(cfg, mbs, num_microbatches)
    plain = sum(activation_bytes(cfg, mbs, num_microbatches, recompute=None))
    full = sum(activation_bytes(cfg, mbs, num_microbatches, recompute="full"))
    workspace = logprob_workspace_bytes(cfg, mbs)
    plan = MemoryPlan(weights, gradients, optimizer, activations, rebuilt, plain, full,
                      workspace, trained, params, 0, dispatcher_bytes(cfg, mbs), experts,
                      _linear_attention_state(cfg, mbs, num_microbatches))
    if micro_batch_size is None:
        plan.per_micro_batch = memory_plan(cfg, world_size, mbs + 1).total - plan.total
    return plan


def _linear_attention_state(cfg, micro_batch_size: int, num_microbatches: int) -> int:
    """GDN recurrent states + conv buffers of the first stage, all micro-batches in flight."""
    m = cfg.model
    layers = -(-m.num_layers // cfg.parallel.pipeline_model_parallel_size)
    count = sum(_layer_kinds(m)[:layers])
    if not count:
        return 0
    tokens = _rows(cfg, micro_batch_size) * cfg.data.max_seq_length
    one = gdn_layer_activation_bytes(cfg, tokens, _rows(cfg, micro_batch_size))[1]
    return int(count * one * _in_flight(cfg, num_microbatches))


def _moe_rows(cfg, plan: MemoryPlan, world_size: int) -> list:
    """The plan's mixture-of-experts rows (none for a dense model)."""
    m, p = cfg.model, cfg.parallel
    if m.num_moe_experts is None:
        return []
    local = m.num_moe_experts // p.expert_model_parallel_size
    edp = p.expert_data_parallel_size(world_size)
    return [
        ("  of which experts", plan.expert_params * DTYPE_BYTES[cfg.precision.precision],
         f"{plan.expert_params:,} parameters: {local} of {m.num_moe_experts} experts per layer "
         f"(EP {p.expert_model_parallel_size}, ETP {p.expert_tensor}); optimizer state / "
         f"{edp} expert-DP ranks" if cfg.optim.use_distributed_optimizer else
         f"{plan.expert_params:,} parameters: {local} of {m.num_moe_experts} experts per layer"),
        ("dispatcher buffers", plan.dispatcher,
         f"{m.moe_token_dispatcher_type}, one MoE layer, top-{m.moe_router_topk}"),
    ]


def largest_micro_batch(cfg, world_size: int, gpu_bytes: float,
                        reserve_bytes: float = RESERVE_GIB * GIB, limit: int = 4096) -> int:
    """The largest micro_batch_size whose plan fits ``gpu_bytes - reserve_bytes`` (0: none)."""
    budget = gpu_bytes - reserve_bytes
    best, low, high = 0, 1, limit
    while low <= high:
        mid = (low + high) // 2
        if memory_plan(cfg, world_size, mid).total <= budget:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def format_plan(cfg, world_size: int, gpu_memory_gib: float) -> str:
    """The table ``nemo-aot train --plan`` prints."""
    from nemo_aot.algorithms.rules import check_option

    check_option("--gpu-memory-gib", gpu_memory_gib)
    plan = memory_plan(cfg, world_size)
    p = cfg.parallel
    dp = p.data_parallel_size(world_size)
    fits = largest_micro_batch(cfg, world_size, gpu_memory_gib * GIB)
    recompute = cfg.performance.recompute_granularity or "off"
    rows = [
        ("weights", plan.weights, f"{plan.stage_params:,} parameters on the heaviest stage, "
                                  f"{cfg.precision.precision}"),
        ("gradients", plan.gradients, f"fp32 DDP buffer, {plan.trained_params:,} trained"),
        ("optimizer", plan.optimizer, "Adam moments" + (
            "" if cfg.precision.precision == "fp32" else " + fp32 main weights") + (
            f", / {dp} (distributed optimizer)" if cfg.optim.use_distributed_optimizer else "")),
        ("activations", plan.activations, f"recomputation {recompute}; micro-batch "
                                          f"{cfg.trainer.micro_batch_size} samples = "
                                          f"{_rows(cfg, cfg.trainer.micro_batch_size)} x "
                                          f"{cfg.data.max_seq_length} tokens"),
        ("  without recompute", plan.activations_no_recompute, ""),
        ("  full recompute", plan.activations_full_recompute,
         "every layer's input kept, one layer rebuilt at a time"),
        *([("  of which GDN state", plan.linear_attention_state,
            "Gated DeltaNet recurrent states + conv buffers, without recompute")]
          if plan.linear_attention_state else []),
        ("recompute workspace", plan.recompute_workspace,
         "one recomputed group, during its backward"),
        ("log-prob workspace", plan.logprob_workspace,
         f"last stage, logprobs_from={cfg.alignment.logprobs_from}"),
        *_moe_rows(cfg, plan, world_size),
        ("total", plan.total, f"static + activations + the larger workspace; + ~{RESERVE_GIB:g} "
                              "GiB CUDA context / NCCL / fragmentation"),
    ]
    experts = (f", experts ETP{p.expert_tensor} x EP{p.expert_model_parallel_size} x "
               f"expert-DP{p.expert_data_parallel_size(world_size)}"
               if cfg.model.num_moe_experts is not None else "")
    lines = [f"memory plan per GPU: TP{p.tensor_model_parallel_size} x "
             f"PP{p.pipeline_model_parallel_size} x DP{dp}{experts} ({world_size} GPUs), "
             f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
             f"vocab {cfg.model.vocab_size}"]
    lines += [f"  {name:<20} {value / GIB:9.2f} GiB  {note}" for name, value, note in rows]
    lines.append(f"  one more sample per micro-batch adds {plan.per_micro_batch / GIB:.2f} GiB; "
                 f"largest trainer.micro_batch_size that fits {gpu_memory_gib:g} GiB: "
                 f"{fits if fits else 'none (change the layout or turn on recomputation)'}")
    return "\n".join(lines)
