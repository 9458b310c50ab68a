"""Benchmark: one AOT training step in nemo_aot (megatron-core) vs Hugging Face transformers / TRL.

    python scripts/bench_aot_step.py --shape tiny                               # CPU, ~1 minute
    python scripts/bench_aot_step.py --shape llama-1b --pairs 8 --seq 1024      # one GPU
    python -m benchmarks.aot_step --shape tiny                                  # the same

Every variant trains the same Llama model (the same initial weights: a nemo_aot model's,
exported to Hugging Face names through nemo_aot.conversion) on the same tokens with the same loss
(aot_unpaired, logistic surrogate, ``nemo_aot.losses.preference_loss``, sorted within the batch
as TRL does), all in one process:

  nemo_aot_cached  MegatronGPTAOTModel + AOTTrainer.train_single_step: megatron-core local spec
                   with SDPA attention, chunked vocab-parallel log-probs, megatron DDP and optimizer
                   (fp32 master weights and grads). Reference log-probs come from the cached
                   scoring pass (``model.score`` once, before training): no reference forward.
  nemo_aot_ref     the same plus a per-step no-grad forward of a resident reference model scored
                   by ``PolicyRunner.score``: the work TRL does.
  hf               LlamaForCausalLM (SDPA) policy forward/backward + reference forward under
                   no_grad, full logits and the classic TRL ``selective_log_softmax``, AdamW (fused
                   on GPU, as the HF Trainer's default), grad-norm clip 1.0: TRL's DPOTrainer step.
  hf_trl_fused     hf with TRL's fused LM head (per-token log-probs in tiles; logits never
                   materialized; TRL >= 1.x). Skipped when trl is not importable.
  hf_liger         hf with Liger kernels patched in (RoPE, RMSNorm, SwiGLU; what
                   ``use_liger_kernel`` gives). Skipped when liger-kernel is not importable (it
                   needs triton, i.e. a GPU).

A step = reference forward (where the variant does one) + policy forward/backward + optimizer
step over 2 x pairs sequences of --seq tokens (chosen and rejected); batches are on the device
before the clock starts. Per variant: median step time, tokens/s, TFLOP/s, MFU, peak memory,
and the ratios nemo_aot / HF. Losses are recorded per step: every variant starts from the same
weights and sees the same batch, so the traces agree to numerical precision (fp32 on CPU,
bf16 vs fp32-master on GPU) - a check that like is compared with like.

FLOPs (``nemo_aot.algorithms.reporting.flops_per_token``; no recompute, no causal discount):
    N = L [h (n_q + 2 n_kv) d + n_q d h + 3 h f] + h V        (matmul weights per token)
    trained token = 6 N + 12 L n_q d s,   reference (no-grad) token = 2 N + 4 L n_q d s
    MFU = FLOPs of the step / step time / peak dense bf16 FLOP/s of the device

Memory (``memory.PeakMemory``): on CUDA, ``torch.cuda.max_memory_allocated`` over the variant's
build, warm-up and timed steps (variants run one after another, each freed before the next). On
CPU, the rise of the bytes malloc hands out (glibc ``mallinfo2``; the process RSS where it is
missing) over the variant's build and warm-up, sampled every millisecond: approximate, orders of
magnitude only.

Schedule (``timing.run_variants``): on CUDA the variants run one after another (memory). On CPU
all are built first and the timed steps interleave round-robin, so load from other processes hits
every variant alike.

Modules: ``bench`` (shapes, the shared batch and initial weights), ``variants`` (one builder per
variant), ``memory`` (the peak-memory probe), ``timing`` (warm-up, timed steps, schedule),
``report`` (summary, ratios against the baselines run in the same process, table, JSON) and
``__main__`` (command line).
"""
