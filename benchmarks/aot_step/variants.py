"""The variants: one builder per name, each returning a ready-to-time training step.

Every builder starts from ``Bench.state`` (the same initial weights) and ``Bench.micro_batches``
(the same tokens) and trains with the same loss (``aot_unpaired``, logistic surrogate, sorted
within the batch), learning rate and Adam hyperparameters, so the loss traces of all variants
agree and their times compare like with like.
"""

from __future__ import annotations

import torch

from .bench import LR, Bench, Unavailable, Variant, load_state


# ---------------------------------------------------------------------------- nemo_aot
def build_nemo(bench: Bench, reference_forward: bool,
               logprobs_from: str = "hidden_states") -> Variant:
    """MegatronGPTAOTModel + AOTTrainer.train_single_step (the model places its chunks on this
    rank's device before megatron DDP allocates its buffers). The step's micro-batches carry
    their reference log-probs (scored here: once, or every step with ``reference_forward``)."""
    from nemo_aot.algorithms.config import AOTConfig, OptimConfig, TrainerConfig
    from nemo_aot.algorithms.objective import PreferenceObjective
    from nemo_aot.algorithms.resolve import Schedule
    from nemo_aot.algorithms.trainer import AOTTrainer, build_optimizer
    from nemo_aot.losses.config import AlignmentConfig
    from nemo_aot.models.aot_model import MegatronGPTAOTModel
    from nemo_aot.models.options import PrecisionConfig
    from nemo_aot.models.reference import NoReference

    a = bench.args
    precision = PrecisionConfig(precision=bench.precision)
    alignment = AlignmentConfig(loss_type="aot_unpaired", beta=a.beta, sort_scope="micro",
                                logprobs_from=logprobs_from)
    if a.logprob_chunk_size:
        alignment.logprob_chunk_size = a.logprob_chunk_size
    model = MegatronGPTAOTModel(bench.model_cfg, precision=precision,
                                logprobs_from=alignment.logprobs_from,
                                logprob_chunk_size=alignment.logprob_chunk_size)
    load_state(model.chunks[0].module, bench.state)
    cfg = AOTConfig(model=bench.model_cfg, precision=precision, alignment=alignment,
                    trainer=TrainerConfig(max_steps=a.warmup + a.steps, max_epochs=None,
                                          global_batch_size=a.pairs,
                                          micro_batch_size=a.pairs // a.micro_batches,
                                          grad_clip=1.0, nonfinite="abort"),
                    optim=OptimConfig(lr=LR, warmup_steps=0, lr_decay_style="constant"))
    schedule = Schedule(a.warmup + a.steps, None, 0, cfg.trainer.global_batch_size,
                        cfg.trainer.micro_batch_size)
    optimizer, scheduler = build_optimizer(cfg, schedule, model)
    trainer = AOTTrainer(cfg, schedule, policy=model,
                         objective=PreferenceObjective(alignment), reference=NoReference(),
                         optimizer=optimizer, scheduler=scheduler, train_batches=[],
                         val_batches=[], save_fn=lambda t: None, log_fn=lambda *unused: None)
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
    """A frozen copy of the initial model on the device, scored by ``PolicyRunner.score``."""
    from nemo_aot.distributed.parallel import ParallelConfig
    from nemo_aot.models.config import to_transformer_config
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.policy_runner import PolicyRunner

    cfg = bench.model_cfg
    config = to_transformer_config(cfg, ParallelConfig(), bench.precision,
                                   perform_initialization=False)
    chunks = [c.to(bench.device).eval().requires_grad_(False)
              for c in build_model_chunks(cfg, config)]
    load_state(chunks[0], bench.state)
    runner = PolicyRunner(chunks, config, vocab_size=cfg.vocab_size,
                          padded_vocab_size=cfg.padded_vocab_size(1),
                          logprobs_from=alignment.logprobs_from,
                          logprob_chunk_size=alignment.logprob_chunk_size)
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


def hf_models(bench: Bench, patch) -> tuple:
    """(policy, reference): two LlamaForCausalLM (SDPA) with the initial weights, as TRL keeps a
    separate reference model; ``patch`` (or None) is applied to each."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nemo_aot.conversion.architectures import LLAMA, hf_config_from_model

    config = LlamaConfig(**hf_config_from_model(bench.model_cfg, LLAMA, "float32"))
    weights = hf_state(bench)
    models = []
    for _ in range(2):
        with torch.device(bench.device):
            m = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=bench.dtype)
        missing, unexpected = m.load_state_dict(weights, strict=False)
        tied = ["lm_head.weight"] if config.tie_word_embeddings else []
        if sorted(missing) != tied or unexpected:
            raise RuntimeError(f"HF weights do not fit: missing {missing}, unexpected {unexpected}")
        if patch is not None:
            patch(m)
        models.append(m)
    policy, reference = models
    policy.train()
    reference.eval().requires_grad_(False)
    return policy, reference


def build_hf(bench: Bench, kind: str) -> Variant:
    """TRL's DPOTrainer step: reference forward under no_grad, policy forward/backward, grad-norm
    clip 1.0, AdamW (fused on GPU, the HF Trainer's default)."""
    from nemo_aot.algorithms.config import OptimConfig
    from nemo_aot.losses import preference_loss

    patch = HF_PATCHES[kind]
    if patch is not None:
        patch = patch(bench)  # raises Unavailable before anything is built
    policy, reference = hf_models(bench, patch)
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


def trl_fused_head(bench: Bench):
    """TRL's ``add_fused_lm_head`` (log-probs in tiles; logits never materialized)."""
    if bench.device.type != "cuda" and not bench.args.variants_named:
        raise Unavailable("TRL's fused LM head runs a triton kernel on GPU; on CPU it falls back "
                          "to a tile loop that is no baseline (name it in --variants to run it)")
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError as err:
        raise Unavailable(f"trl with add_fused_lm_head is not importable ({err})") from None
    return add_fused_lm_head


def liger_patch(bench: Bench):
    """Liger kernels for RoPE, RMSNorm and SwiGLU (what ``use_liger_kernel`` gives)."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError as err:
        raise Unavailable(f"liger-kernel is not importable ({err}); pip install liger-kernel "
                          "(needs triton and a GPU)") from None

    def patch(model):
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=model)
    return patch


# kind -> a function of the bench returning the per-model patch (or raising Unavailable)
HF_PATCHES = {"plain": None, "trl_fused": trl_fused_head, "liger": liger_patch}

# The registry: name -> builder, in the order the variants run and are reported.
BUILDERS = {
    "nemo_aot_cached": lambda b: build_nemo(b, reference_forward=False),
    "nemo_aot_ref": lambda b: build_nemo(b, reference_forward=True),
    # the step before log-probs came from the hidden states: the model's logits, then the kernel
    "nemo_aot_logits": lambda b: build_nemo(b, reference_forward=False, logprobs_from="logits"),
    "hf": lambda b: build_hf(b, "plain"),
    "hf_trl_fused": lambda b: build_hf(b, "trl_fused"),
    "hf_liger": lambda b: build_hf(b, "liger"),
}
VARIANTS = tuple(BUILDERS)
