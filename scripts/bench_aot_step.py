"""Benchmark: one AOT training step in nemo_aot (megatron-core) vs Hugging Face transformers / TRL.

    python scripts/bench_aot_step.py --shape tiny                               # CPU, ~1 minute
    python scripts/bench_aot_step.py --shape llama-1b --pairs 8 --seq 1024      # one GPU

Every variant trains the same Llama model (the same initial weights: a nemo_aot model's, exported
to Hugging Face names through nemo_aot.conversion) on the same tokens with the same loss
(aot_unpaired, logistic surrogate, ``nemo_aot.losses.preference_loss``, sorted within the batch
as TRL does), all in one process:

  nemo_aot_cached  MegatronGPTAOTModel + AOTTrainer.train_single_step: megatron-core local spec
                   with SDPA attention, chunked vocab-parallel log-probs, megatron DDP and optimizer
                   (fp32 master weights and grads). Reference log-probs come from the cached
                   scoring pass (``model.score`` once, before training): no reference forward.
  nemo_aot_ref     the same plus a per-step no-grad forward of a resident reference model scored
                   by ``AOTStep.score``: the work TRL does.
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

FLOPs (``nemo_aot.algorithms.observability.flops_per_token``; no recompute, no causal discount):
    N = L [h (n_q + 2 n_kv) d + n_q d h + 3 h f] + h V        (matmul weights per token)
    trained token = 6 N + 12 L n_q d s,   reference (no-grad) token = 2 N + 4 L n_q d s
    MFU = FLOPs of the step / step time / peak dense bf16 FLOP/s of the device

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the variant's build, warm-up and timed
steps (variants run one after another, each freed before the next). On CPU, the rise of the
process RSS over the variant's build and warm-up, sampled every 2 ms: approximate (the
allocator reuses memory freed by earlier variants), orders of magnitude only.

Schedule: on CUDA the variants run one after another (memory). On CPU all are built first and
the timed steps interleave round-robin, so load from other processes hits every variant alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
import traceback
from typing import Callable, Optional

import torch

from nemo_aot.models.config import GPTModelConfig, RopeScaling

LR = 1e-5
VARIANTS = ("nemo_aot_cached", "nemo_aot_ref", "hf", "hf_trl_fused", "hf_liger")
FLOP_FORMULA = ("N = L*[h*(n_q+2*n_kv)*d + n_q*d*h + 3*h*f] + h*V; "
                "trained token = 6N + 12*L*n_q*d*s; reference (no-grad) token = 2N + 4*L*n_q*d*s; "
                "MFU = step FLOPs / step time / peak dense bf16 FLOP/s")
_LLAMA32_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
SHAPES = {
    # Llama-style, tied embeddings like Llama-3.2-1B, small enough for two CPU cores.
    "tiny": dict(pairs=4, seq=64, model=GPTModelConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
        num_query_groups=4, vocab_size=4096, share_embeddings_and_output_weights=True)),
    # Llama-3.2-1B: the anchor shape.
    "llama-1b": dict(pairs=4, seq=1024, model=GPTModelConfig(
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, rotary_base=500000.0, rope_scaling=_LLAMA32_ROPE,
        share_embeddings_and_output_weights=True, max_position_embeddings=131072)),
    # Llama-3-8B widths with a few layers (--layers), to fit one card next to HF.
    "llama-8b-layer-slice": dict(pairs=4, seq=1024, model=GPTModelConfig(
        num_layers=4, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
        num_query_groups=8, vocab_size=128256, rotary_base=500000.0,
        max_position_embeddings=8192)),
}


class Unavailable(Exception):
    """A variant that cannot run here (a missing optional package); recorded as skipped."""


@dataclasses.dataclass
class Variant:
    step: Callable[[], float]
    """One training step; returns its loss."""
    reference_forward: bool
    """Whether the step runs a reference forward (counted as no-grad FLOPs)."""


@dataclasses.dataclass
class Bench:
    """What every variant shares: arguments, model shape, device, initial weights, batch."""

    args: argparse.Namespace
    model_cfg: GPTModelConfig
    device: torch.device
    precision: str
    state: dict  # megatron-core state dict (TP=1) of the initial weights, on the CPU
    batch: list  # micro-batches in nemo_aot.data.collate's layout, on the CPU

    @property
    def dtype(self) -> torch.dtype:
        from nemo_aot.models.config import params_dtype

        return params_dtype(self.precision)

    def micro_batches(self) -> list[dict]:
        """A fresh copy of the batch on the device (variants write their reference log-probs)."""
        return [{k: v.to(self.device) for k, v in mb.items()} for mb in self.batch]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------- inputs
def make_batch(pairs: int, seq: int, vocab: int, micro_batches: int, seed: int) -> list[dict]:
    """Random pairs (chosen rows, then rejected rows per micro-batch); a pair shares its prompt,
    the first quarter of the sequence; every row is full length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, seq // 4)
    tokens = torch.randint(0, vocab, (2 * pairs, seq + 1), generator=g)
    tokens[pairs:, :prompt] = tokens[:pairs, :prompt]
    per = pairs // micro_batches
    out = []
    for m in range(micro_batches):
        index = torch.arange(m * per, (m + 1) * per)
        rows = tokens[torch.cat([index, pairs + index])]
        n = rows.shape[0]
        loss_mask = torch.zeros(n, seq)
        loss_mask[:, prompt - 1:] = 1.0  # labels[:, t] = input_ids[:, t + 1]
        labels = rows[:, 1:].contiguous()
        out.append({
            "input_ids": rows[:, :-1].contiguous(), "labels": labels, "loss_mask": loss_mask,
            "position_ids": torch.arange(seq).expand(n, seq).contiguous(),
            "seq_lengths": torch.full((n,), seq), "prompt_lengths": torch.full((n,), prompt),
            "label": torch.arange(n) < per, "pair_index": torch.full((n,), -1),
            "sample_index": torch.cat([index, index]), "sample_weight": torch.ones(n),
            "reward": torch.full((n,), float("nan")), "reference_logps": torch.zeros(n),
            # Hugging Face inputs: TRL passes the attention mask; the fused head takes
            # pre-shifted labels with -100 outside the response.
            "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "shift_labels": labels.masked_fill(loss_mask == 0, -100)})
    return out


def initial_state(model_cfg: GPTModelConfig, precision: str) -> dict:
    """One megatron-core model's freshly initialized weights (TP=1, on the CPU)."""
    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks

    config = to_transformer_config(model_cfg, ParallelConfig(), precision)
    (model,) = build_model_chunks(model_cfg, config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def load_state(module: torch.nn.Module, state: dict) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"initial weights do not fit: missing {missing}, "
                           f"unexpected {unexpected}")


# ---------------------------------------------------------------------------- nemo_aot
def device_model_class():
    """MegatronGPTAOTModel with its chunks on the current CUDA device (a no-op on CPU).

    The model class builds the chunks on the CPU (``use_cpu_initialization``) and wraps them in
    megatron DDP as they are; on a GPU they must move first, before DDP allocates its buffers.
    """
    from nemo_aot.models.aot_model import MegatronGPTAOTModel

    class MegatronGPTAOTModelOnDevice(MegatronGPTAOTModel):
        def _wrap_ddp(self, chunks, use_distributed_optimizer):
            if torch.cuda.is_available():
                chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
            return super()._wrap_ddp(chunks, use_distributed_optimizer)

    return MegatronGPTAOTModelOnDevice


def build_nemo(bench: Bench, reference_forward: bool) -> Variant:
    from nemo_aot.algorithms.config import AOTConfig, OptimConfig, TrainerConfig
    from nemo_aot.algorithms.trainer import AOTTrainer, build_optimizer
    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.aot_model import model_cfg_node
    from nemo_aot.models.options import AlignmentConfig, PrecisionConfig

    a = bench.args
    precision = PrecisionConfig(precision=bench.precision)
    alignment = AlignmentConfig(loss_type="aot_unpaired", beta=a.beta, sort_scope="micro")
    if a.logprob_chunk_size:
        alignment.logprob_chunk_size = a.logprob_chunk_size
    model = device_model_class()(model_cfg_node(bench.model_cfg, precision, ParallelConfig(),
                                                alignment))
    load_state(model.chunks[0].module, bench.state)
    cfg = AOTConfig(model=bench.model_cfg, precision=precision, alignment=alignment,
                    trainer=TrainerConfig(max_steps=a.warmup + a.steps, global_batch_size=a.pairs,
                                          micro_batch_size=a.pairs // a.micro_batches,
                                          grad_clip=1.0, nonfinite="abort"),
                    optim=OptimConfig(lr=LR, warmup_steps=0, lr_decay_style="constant"))
    optimizer, scheduler = build_optimizer(cfg, model, a.warmup + a.steps)
    trainer = AOTTrainer(cfg, model, optimizer, scheduler, [], [], save_fn=lambda t: None,
                         log_fn=lambda *unused: None)
    micro_batches = bench.micro_batches()
    scorer = reference_scorer(bench, alignment) if reference_forward else model.score

    def attach_reference():
        for mb, (_, _, logps, _) in zip(micro_batches, scorer(micro_batches)):
            mb["reference_logps"] = logps

    if not reference_forward:
        attach_reference()  # the cached scoring pass: once, with the initial (= reference) weights

    def step() -> float:
        if reference_forward:
            attach_reference()
        return trainer.train_single_step(micro_batches)["loss"]

    return Variant(step, reference_forward)


def reference_scorer(bench: Bench, alignment):
    """A frozen copy of the initial model on the device, scored by AOTStep.score."""
    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.aot_step import AOTStep
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks

    cfg = bench.model_cfg
    config = to_transformer_config(cfg, ParallelConfig(), bench.precision,
                                   perform_initialization=False)
    chunks = [c.to(bench.device).eval().requires_grad_(False)
              for c in build_model_chunks(cfg, config)]
    load_state(chunks[0], bench.state)
    runner = AOTStep(chunks, config, vocab_size=cfg.vocab_size,
                     padded_vocab_size=cfg.padded_vocab_size(1), alignment=alignment)
    return runner.score


# ---------------------------------------------------------------------------- Hugging Face
def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(index), row by row: TRL's DPOTrainer (0.1x-0.2x) path."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return torch.stack([torch.log_softmax(row, dim=-1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
                        for row, i in zip(logits, index)])


def hf_state(bench: Bench) -> dict:
    """The initial weights under Hugging Face Llama names (nemo_aot's conversion tables)."""
    from nemo_aot.conversion.architectures import LLAMA
    from nemo_aot.conversion.engine import expand, export

    cfg = bench.model_cfg
    return dict(export(expand(LLAMA.mappings(cfg), cfg.num_layers), bench.state, cfg))


def build_hf(bench: Bench, kind: str) -> Variant:
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_aot.algorithms.config import OptimConfig
    from nemo_aot.conversion.architectures import LLAMA, hf_config_from_model
    from nemo_aot.losses import preference_loss

    patch = {"plain": None, "trl_fused": _trl_fused_head, "liger": _liger_patch}[kind]
    if patch is not None:
        patch = patch(bench)  # raises Unavailable before anything is built
    config = LlamaConfig(**hf_config_from_model(bench.model_cfg, LLAMA, "float32"))
    weights = hf_state(bench)
    models = []
    for _ in range(2):  # policy, reference (TRL keeps a separate reference model)
        with torch.device(bench.device):
            m = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=bench.dtype)
        missing, unexpected = m.load_state_dict(weights, strict=False)
        tied = ["lm_head.weight"] if config.tie_word_embeddings else []
        if sorted(missing) != tied or unexpected:
            raise RuntimeError(f"HF weights do not fit: missing {missing}, unexpected {unexpected}")
        if patch is not None:
            patch(m)
        models.append(m)
    del weights
    policy, reference = models
    policy.train()
    reference.eval().requires_grad_(False)
    o = OptimConfig()  # the same Adam hyperparameters as the nemo_aot variants
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(o.adam_beta1, o.adam_beta2),
                                  eps=o.adam_eps, weight_decay=0.0,
                                  fused=bench.device.type == "cuda")
    micro_batches = bench.micro_batches()
    a = bench.args

    def sequence_logps(model, mb):
        inputs = dict(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                      use_cache=False)
        if kind == "trl_fused":
            return model(**inputs, shift_labels=mb["shift_labels"], fused_lm_head=True
                         ).log_probs.sum(-1)
        per_token = selective_log_softmax(model(**inputs).logits, mb["labels"])
        return (per_token * mb["loss_mask"]).sum(-1)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for mb in micro_batches:
            with torch.no_grad():
                ref_c, ref_r = sequence_logps(reference, mb).chunk(2)  # rows: chosen, rejected
            pol_c, pol_r = sequence_logps(policy, mb).chunk(2)
            loss, _ = preference_loss(pol_c, pol_r, ref_c, ref_r, loss_type="aot_unpaired",
                                      beta=a.beta, check_finite=False)
            (loss / len(micro_batches)).backward()
            total = total + loss.detach() / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        return float(total)

    return Variant(step, True)


def _trl_fused_head(bench: Bench):
    if bench.device.type != "cuda" and not bench.args.variants_named:
        raise Unavailable("TRL's fused LM head runs a triton kernel on GPU; on CPU it falls back "
                          "to a tile loop that is no baseline (name it in --variants to run it)")
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError as err:
        raise Unavailable(f"trl with add_fused_lm_head is not importable ({err})") from None
    return add_fused_lm_head


def _liger_patch(bench: Bench):
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as err:
        raise Unavailable(f"liger-kernel is not importable ({err}); pip install liger-kernel "
                          "(needs triton and a GPU)") from None

    def patch(model):
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    return patch


BUILDERS = {
    "nemo_aot_cached": lambda b: build_nemo(b, reference_forward=False),
    "nemo_aot_ref": lambda b: build_nemo(b, reference_forward=True),
    "hf": lambda b: build_hf(b, "plain"),
    "hf_trl_fused": lambda b: build_hf(b, "trl_fused"),
    "hf_liger": lambda b: build_hf(b, "liger"),
}


# ---------------------------------------------------------------------------- measurement
class PeakMemory:
    """Peak memory a variant adds: the highest bytes-in-use minus the bytes in use at start().

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: bytes handed out by malloc (glibc
    ``mallinfo2``: in-use arena chunks + mmapped chunks; not fooled by memory the allocator keeps
    cached), sampled every millisecond by a thread; the process RSS where mallinfo2 is missing.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._read = self._mallinfo_reader()
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated minus allocated at the variant's start"
        elif self._read is not None:
            self.method = ("malloc bytes in use (glibc mallinfo2), peak rise over build + warm-up, "
                           "sampled every 1 ms (approximate: short peaks can be missed)")
        else:
            import psutil

            self._read = lambda: psutil.Process().memory_info().rss
            self.method = ("process RSS rise over build + warm-up, sampled every 1 ms "
                           "(approximate: the allocator reuses memory freed earlier)")
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def _mallinfo_reader() -> Optional[Callable[[], int]]:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        try:
            fn = ctypes.CDLL(None).mallinfo2
        except (OSError, AttributeError):
            return None
        fn.restype = MallInfo2

        def read() -> int:
            info = fn()
            return info.uordblks + info.hblkhd
        return read

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        self._base = self._peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._read())

    def stop(self) -> Optional[float]:
        """GiB added at the peak since start(); None when not started."""
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self._base) / 2**30
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._peak = max(self._peak, self._read())
        return (self._peak - self._base) / 2**30


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(bench: Bench, variant: Variant) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, loss) of one step."""
    bench.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = variant.step()
    bench.sync()
    return time.perf_counter() - t0, time.process_time() - c0, float(loss)


def start_variant(bench: Bench, name: str, memory: PeakMemory, record: dict,
                  memory_after_warmup: bool):
    """Build and warm up one variant; fills ``record``; returns the variant or None."""
    free_device_memory()
    memory.start()
    try:
        t0 = time.perf_counter()
        variant = BUILDERS[name](bench)
        record["build_s"] = time.perf_counter() - t0
        for _ in range(bench.args.warmup):
            record["losses"].append(timed(bench, variant)[2])
    except Unavailable as err:
        memory.stop()
        record.update(status="skipped", reason=str(err))
        print(f"  {name}: skipped ({err})", flush=True)
        return None
    except Exception as err:  # an OOM at a large batch is a result, not a crash of the bench
        memory.stop()
        record.update(status="error", reason=f"{type(err).__name__}: {err}"[:2000])
        traceback.print_exc()
        print(f"  {name}: FAILED ({type(err).__name__})", flush=True)
        return None  # its memory is freed before the next variant starts
    record["reference_forward"] = variant.reference_forward
    if memory_after_warmup:
        record["peak_memory_gib"] = memory.stop()
    return variant


def time_steps(bench: Bench, variant: Variant, record: dict, steps: int) -> None:
    for _ in range(steps):
        seconds, cpu_seconds, loss = timed(bench, variant)
        record["step_times_s"].append(seconds)
        record["step_cpu_s"].append(cpu_seconds)
        record["losses"].append(loss)


def prime(bench: Bench, names: list[str]) -> None:
    """CPU: build and step one variant of each framework once, unmeasured, so one-time process
    allocations (thread pools, BLAS/oneDNN buffers, lazy imports) are not charged to whichever
    variant happens to be measured first."""
    for prefix in ("nemo_aot", "hf"):
        name = next((n for n in names if n.startswith(prefix)), None)
        if name is None:
            continue
        try:
            BUILDERS[name](bench).step()
        except Exception:  # reported by the measured pass
            pass
        gc.collect()


def run_variants(bench: Bench, names: list[str], schedule: str) -> dict:
    memory = PeakMemory(bench.device)
    if not memory.cuda:
        prime(bench, names)
    records = {n: {"status": "ok", "losses": [], "step_times_s": [], "step_cpu_s": []}
               for n in names}
    steps = bench.args.steps
    if schedule == "sequential":
        for name in names:
            print(f"-- {name}", flush=True)
            # CPU: the sampler thread must not run during timed steps
            variant = start_variant(bench, name, memory, records[name],
                                    memory_after_warmup=not memory.cuda)
            if variant is None:
                continue
            try:
                time_steps(bench, variant, records[name], steps)
            except Exception as err:
                records[name].update(status="error", reason=f"{type(err).__name__}: {err}"[:2000])
                traceback.print_exc()
            if memory.cuda:
                records[name]["peak_memory_gib"] = memory.stop()
            del variant
    else:
        live = {}
        for name in names:
            print(f"-- {name}: build + warm-up", flush=True)
            variant = start_variant(bench, name, memory, records[name], memory_after_warmup=True)
            if variant is not None:
                live[name] = variant
        print(f"-- timed: {steps} interleaved rounds over {list(live)}", flush=True)
        for _ in range(steps):
            for name, variant in live.items():
                time_steps(bench, variant, records[name], 1)
        for name in live:
            records[name]["interleaved"] = True
    for record in records.values():
        record["memory_method"] = memory.method
    return records


# ---------------------------------------------------------------------------- report
def summarize(bench: Bench, records: dict, peak_tflops: Optional[float]) -> dict:
    from nemo_aot.algorithms.observability import flops_per_token, throughput

    a, cfg = bench.args, bench.model_cfg
    tokens = 2 * a.pairs * a.seq
    for record in records.values():
        times = record["step_times_s"]
        if record["status"] != "ok" or not times:
            continue
        median = statistics.median(times)
        rate = throughput(tokens, median, cfg, 1, seq_length=a.seq, peak_tflops=peak_tflops,
                          forward_only_tokens=tokens if record["reference_forward"] else 0,
                          device_name="cpu" if bench.device.type == "cpu" else None)
        record.update(median_step_s=median, mean_step_s=statistics.fmean(times),
                      min_step_s=min(times), tokens_per_s=rate["tokens_per_s"],
                      tflops=rate["tflops_per_device"], mfu=rate["mfu"],
                      median_step_cpu_s=statistics.median(record["step_cpu_s"]))
    ok = {n: r for n, r in records.items() if "tokens_per_s" in r}
    ratios = {}
    for mine in (n for n in ok if n.startswith("nemo_aot")):
        for base in (n for n in ok if n.startswith("hf")):
            ratios[f"{mine}/{base}"] = ratio(ok[mine], ok[base])
    losses = {n: r["losses"] for n, r in records.items() if r["status"] == "ok" and r["losses"]}
    anchor = "hf" if "hf" in losses else next(iter(losses), None)
    loss_check = None
    if anchor is not None:  # losses[0] is log 2 everywhere (reference = initial policy)
        ref = losses[anchor]
        loss_check = {"against": anchor,
                      "after_first_update": {n: abs(v[1] - ref[1]) for n, v in losses.items()
                                             if len(v) > 1 and len(ref) > 1},
                      "max_abs_diff": {n: max(abs(x - y) for x, y in zip(v, ref))
                                       for n, v in losses.items()}}
    return {"tokens_per_step": tokens,
            "flops": {"formula": FLOP_FORMULA,
                      "trained_flops_per_token": flops_per_token(cfg, a.seq, training=True),
                      "reference_flops_per_token": flops_per_token(cfg, a.seq, training=False),
                      "peak_tflops": peak_tflops},
            "variants": records, "ratios": ratios, "loss_check": loss_check}


def ratio(mine: dict, base: dict) -> dict:
    """mine / base: tokens/s from median wall times; from median process CPU times (steadier on
    a shared CPU); the median over rounds of per-round speed-ups (interleaved runs, where
    round i of both ran back to back); peak memory."""
    out = {"tokens_per_s": mine["tokens_per_s"] / base["tokens_per_s"],
           "tokens_per_cpu_s": base["median_step_cpu_s"] / mine["median_step_cpu_s"],
           "tokens_per_s_paired_rounds": None, "peak_memory": None}
    if mine.get("interleaved") and base.get("interleaved"):
        out["tokens_per_s_paired_rounds"] = statistics.median(
            b / m for m, b in zip(mine["step_times_s"], base["step_times_s"]))
    if mine.get("peak_memory_gib") and base.get("peak_memory_gib"):
        out["peak_memory"] = mine["peak_memory_gib"] / base["peak_memory_gib"]
    return out


def print_report(result: dict) -> None:
    print(f"\nFLOPs: {result['flops']['formula']}")
    print(f"{'variant':18} {'status':8} {'step ms':>9} {'CPU ms':>9} {'tok/s':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
    for name, r in result["variants"].items():
        if "tokens_per_s" not in r:
            print(f"{name:18} {r['status']:8} {r.get('reason', '')[:60]}")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.3f}"
        print(f"{name:18} {'ok':8} {1e3 * r['median_step_s']:9.1f} "
              f"{1e3 * r['median_step_cpu_s']:9.1f} {r['tokens_per_s']:10.0f} "
              f"{r['tflops']:8.3f} {mfu:>6} {mem:>9}")
    for pair, r in result["ratios"].items():
        fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        print(f"ratio {pair:30} tok/s {fmt(r['tokens_per_s'])}  per CPU-s "
              f"{fmt(r['tokens_per_cpu_s'])}  paired rounds {fmt(r['tokens_per_s_paired_rounds'])}"
              f"  peak memory {fmt(r['peak_memory'])}")
    if result["loss_check"]:
        diffs = result["loss_check"]["max_abs_diff"]
        first = result["loss_check"]["after_first_update"]
        print(f"loss traces vs {result['loss_check']['against']}: max |diff| "
              + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items())
              + "; after the first update " + ", ".join(f"{n} {d:.2e}" for n, d in first.items()))
    print(f"memory: {next(iter(result['variants'].values()))['memory_method']}")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "megatron-core", "transformers", "trl", "liger-kernel",
                 "transformer-engine", "nemo-toolkit", "nemo-aot"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--pairs", type=int, help="preference pairs per step (default: the shape's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the shape's)")
    p.add_argument("--layers", type=int, help="override the shape's number of layers")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split the pairs into this many micro-batches (gradient accumulation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--variants",
                   help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all; "
                        "those that cannot run here are recorded as skipped)")
    p.add_argument("--schedule", choices=("auto", "sequential", "interleaved"), default="auto",
                   help="auto: sequential on CUDA, interleaved on CPU")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--logprob-chunk-size", type=int,
                   help="nemo_aot: positions per fp32 log-prob chunk (default: the model's)")
    p.add_argument("--peak-tflops", type=float,
                   help="device peak dense bf16 TFLOP/s for MFU (default: known GPUs; none on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/aot_step_<shape>_"
                                 "p<pairs>_s<seq>_<device>.json)")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    args.pairs = args.pairs or shape["pairs"]
    args.seq = args.seq or shape["seq"]
    args.variants_named = args.variants is not None
    args.variants = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",")
                     if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.pairs < 1 or args.seq < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--pairs >= 1, --seq >= 2, --steps >= 1 and --warmup >= 0 are required")
    if args.pairs % args.micro_batches:
        p.error(f"--micro-batches={args.micro_batches} must divide --pairs={args.pairs}")
    return args


def pick_device(choice: str) -> torch.device:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible")
    if choice == "cpu" and cuda:
        # megatron-core runs on the GPU whenever one is visible (nemo_aot's CPU support is off)
        raise SystemExit("--device cpu on a CUDA host: hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                         "instead")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def model_config(args: argparse.Namespace) -> GPTModelConfig:
    shape = SHAPES[args.shape]["model"]
    return dataclasses.replace(shape, num_layers=args.layers or shape.num_layers,
                               encoder_seq_length=args.seq,
                               max_position_embeddings=max(args.seq, shape.max_position_embeddings))


def default_out(args: argparse.Namespace, label: str) -> str:
    layers = f"_l{args.layers}" if args.layers else ""
    name = f"aot_step_{args.shape}{layers}_p{args.pairs}_s{args.seq}_{slug(label.split(' (')[0])}"
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "results", name + ".json")


def main(argv=None) -> int:
    from nemo_aot.algorithms.observability import peak_tflops_for
    from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    model_cfg = model_config(args)
    schedule = args.schedule if args.schedule != "auto" else (
        "sequential" if device.type == "cuda" else "interleaved")
    if schedule == "interleaved" and "hf_liger" in args.variants and _has("liger_kernel"):
        schedule = "sequential"  # Liger patches transformers' Llama module globally
    label = device_label(device)
    peak = args.peak_tflops or (peak_tflops_for(label) if device.type == "cuda" else None)
    print(f"AOT step benchmark: {args.shape} ({model_cfg.num_layers} layers), {args.pairs} pairs x "
          f"{args.seq} tokens, {precision}, {label}, {schedule}, torch threads "
          f"{torch.get_num_threads()}", flush=True)

    initialize_model_parallel(ParallelConfig(), model_cfg, seed=args.seed)
    bench = Bench(args, model_cfg, device, precision, initial_state(model_cfg, precision),
                  make_batch(args.pairs, args.seq, model_cfg.vocab_size, args.micro_batches,
                             args.seed))
    load_before = os.getloadavg()
    records = run_variants(bench, args.variants, schedule)
    result = {
        "benchmark": "aot_step",
        "device": {"type": device.type, "name": label, "gpu_run": device.type == "cuda"},
        "note": "GPU run" if device.type == "cuda" else (
            "CPU run, no GPU used: CPU ratios only; MFU undefined (no peak FLOP/s); memory is "
            "an approximate malloc peak (see memory_method)"),
        "config": {"shape": args.shape, "model": model_cfg.to_dict(), "pairs": args.pairs,
                   "seq": args.seq, "micro_batches": args.micro_batches, "steps": args.steps,
                   "warmup": args.warmup, "precision": precision, "schedule": schedule,
                   "beta": args.beta, "lr": LR, "seed": args.seed,
                   "logprob_chunk_size": args.logprob_chunk_size,
                   "torch_threads": torch.get_num_threads()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "versions": versions(),
        "command": " ".join(["python", "scripts/bench_aot_step.py"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        **summarize(bench, records, peak),
    }
    print_report(result)
    out = args.out or default_out(args, label)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return 0 if any(r["status"] == "ok" for r in records.values()) else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
