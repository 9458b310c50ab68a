"""The rules across sections of a run's config: each section checks its own fields
(``validate`` on each dataclass); what only holds between sections - the layout and the
batches, sequences and parallelism, the objective and the data, FP8, LoRA - is checked here,
once, by ``check_rules`` when ``nemo_aot.algorithms.resolve`` resolves a run. Every message
names the keys and what to do.
"""

from __future__ import annotations

import math
from typing import Optional

from nemo_aot.algorithms.config import FP8_PAD_MULTIPLE, AOTConfig
from nemo_aot.losses import LOSS_SPECS, get_loss_spec


def check_rules(cfg: AOTConfig, world_size: Optional[int]) -> None:
    """Every section's own rules, then the rules across them, at ``world_size`` ranks (None:
    the rules that do not depend on it; data parallelism is then taken as 1)."""
    for section in (cfg.model, cfg.precision, cfg.data, cfg.alignment, cfg.peft, cfg.trainer,
                    cfg.optim, cfg.checkpoint, cfg.logging):
        section.validate()
    if cfg.init_from is not None and not str(cfg.init_from).strip():
        raise ValueError("init_from is empty; set it to a .nemo path or to null")
    if cfg.data.tokenizer_path is None and not cfg.init_from:
        raise ValueError("data.tokenizer_path is null and there is no init_from to take the "
                         "tokenizer from; set data.tokenizer_path to a tokenizer folder")
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    # not launched: the smallest world the layout fits (experts: ETP x EP x PP ranks)
    smallest = math.lcm(model_parallel, p.expert_tensor * p.expert_model_parallel_size
                        * p.pipeline_model_parallel_size)
    p.validate(world_size if world_size is not None else smallest, cfg.model)
    dp = None if world_size is None else p.data_parallel_size(world_size)
    _check_batches(cfg, dp)
    _check_sequences(cfg)
    _check_objective(cfg, dp)
    _check_fp8(cfg)
    _check_peft(cfg)
    cfg.performance.validate(cfg.model, p, cfg.precision, cfg.optim.use_distributed_optimizer)


def _check_peft(cfg: AOTConfig) -> None:
    """LoRA's combinations with the reference policy, the sort scope and FP8."""
    a, peft = cfg.alignment, cfg.peft
    if a.reference_policy == "adapters_off" and not peft.enabled:
        raise ValueError("alignment.reference_policy=adapters_off needs LoRA adapters to switch "
                         "off: add peft=lora (or use alignment.reference_policy=cached)")
    if not peft.enabled:
        return
    if a.reference_policy == "cpu_swap":
        raise ValueError("alignment.reference_policy=cpu_swap with peft.scheme=lora would keep "
                         "a second copy of every frozen weight; use alignment.reference_policy="
                         "adapters_off (the base without adapters) or cached")
    if peft.dropout > 0 and a.sort_scope == "global":
        raise ValueError(f"peft.dropout={peft.dropout} with alignment.sort_scope=global: the grad "
                         "pass could not reproduce the no-grad pass's rewards; set "
                         "peft.dropout=0 or use sort_scope=data_parallel")
    if cfg.precision.fp8_param:
        raise ValueError("precision.fp8_param with peft.scheme=lora: adapters are merged into "
                         "the base weights on export, which FP8 weights cannot hold exactly; "
                         "set precision.fp8_param=false")
    p = cfg.precision
    if p.fp8 is not None and p.fp8_recipe == "delayed" and a.reference_policy == "adapters_off":
        raise ValueError("alignment.reference_policy=adapters_off with precision.fp8_recipe="
                         "delayed: the reference forward would shift the policy's amax history; "
                         "use alignment.reference_policy=cached or precision.fp8_recipe=tensorwise")
    experts = [t for t in peft.target_modules if t in ("linear_fc1", "linear_fc2")]
    if cfg.model.num_moe_experts is not None and experts:
        raise ValueError(f"peft.target_modules lists {experts}, the MLP of a mixture-of-experts "
                         "model: LoRA on its routed experts is not supported (megatron-core's "
                         "experts are not the linear layers the adapters wrap); set "
                         "peft.target_modules=[linear_qkv,linear_proj] (attention only)")
    if peft.adapter_from is not None and not cfg.init_from:
        raise ValueError("peft.adapter_from needs init_from: the base .nemo the adapter was "
                         "trained on")


def _check_fp8(cfg: AOTConfig) -> None:
    """FP8 combinations that cannot be made right are refused before anything is built."""
    p, a = cfg.precision, cfg.alignment
    if p.fp8_param and not cfg.optim.use_distributed_optimizer:
        raise ValueError("precision.fp8_param needs optim.use_distributed_optimizer=true")
    if p.fp8 is not None and p.fp8_recipe == "delayed" and a.sort_scope == "global":
        # The global scope's no-grad first pass runs the FP8 forward too and updates TE's amax
        # history, so the grad pass would run at other scales and fail its reproduce check.
        raise ValueError("alignment.sort_scope=global with precision.fp8_recipe=delayed: the "
                         "first (no-grad) pass would shift the delayed-scaling amax history "
                         "the grad pass must reproduce; use precision.fp8_recipe=tensorwise "
                         "(current scaling) or alignment.sort_scope=data_parallel")
    if p.fp8_param and a.reference_policy == "cpu_swap":
        raise ValueError("precision.fp8_param with alignment.reference_policy=cpu_swap would "
                         "re-quantize the reference weights on every swap (they would drift "
                         "from the checkpoint); use alignment.reference_policy=cached")
    if p.fp8 is not None and p.fp8_recipe == "delayed" and a.reference_policy == "cpu_swap":
        # The swapped-in reference runs through the policy's modules: its forward would enter
        # the policy's delayed-scaling amax history.
        raise ValueError("alignment.reference_policy=cpu_swap with precision.fp8_recipe=delayed: "
                         "the reference forward would shift the policy's amax history; use "
                         "alignment.reference_policy=cached or precision.fp8_recipe=tensorwise")


def _check_batches(cfg: AOTConfig, dp: Optional[int]) -> None:
    t, p = cfg.trainer, cfg.parallel
    per_step = t.micro_batch_size * (dp or 1)
    if t.global_batch_size % per_step:
        where = f" x data-parallel size ({dp})" if dp else ""
        raise ValueError(f"trainer.global_batch_size={t.global_batch_size} must be a multiple of "
                         f"trainer.micro_batch_size ({t.micro_batch_size}){where}")
    if dp and p.virtual_pipeline_model_parallel_size:
        micro_batches = t.global_batch_size // per_step
        if micro_batches % p.pipeline_model_parallel_size:
            raise ValueError(
                f"trainer.global_batch_size: interleaved pipelining needs the micro-batches per "
                f"rank ({micro_batches}) to be a multiple of parallel.pipeline_model_parallel_size "
                f"({p.pipeline_model_parallel_size})")
    if cfg.data.kind == "unpaired" and t.micro_batch_size < 2:
        raise ValueError("trainer.micro_batch_size must be >= 2 for unpaired data (one positive "
                         "and one negative per micro-batch)")


def _check_sequences(cfg: AOTConfig) -> None:
    data, p = cfg.data, cfg.parallel
    if data.max_seq_length > cfg.model.encoder_seq_length:
        raise ValueError(f"data.max_seq_length={data.max_seq_length} exceeds "
                         f"model.encoder_seq_length={cfg.model.encoder_seq_length}; lower it")
    if cfg.precision.fp8 is not None and data.pad_to_multiple_of % FP8_PAD_MULTIPLE:
        raise ValueError(f"data.pad_to_multiple_of must be a multiple of {FP8_PAD_MULTIPLE} under "
                         f"precision.fp8 (FP8 GEMM shapes), got {data.pad_to_multiple_of}")
    if p.sequence_parallel and data.pad_to_multiple_of % p.tensor_model_parallel_size:
        raise ValueError(f"data.pad_to_multiple_of={data.pad_to_multiple_of} must be a multiple of "
                         f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} "
                         f"under sequence parallelism (the sequence is split across the TP group)")
    if p.pipeline_model_parallel_size > 1 and not data.uniform_step_length:
        raise ValueError("data.uniform_step_length must be true with pipeline parallelism (stages "
                         "exchange activations of one fixed shape per step)")
    if data.pack_sequences and (cfg.precision.transformer_impl != "local"
                                or cfg.model.attention_backend != "sdpa"):
        raise ValueError("data.pack_sequences needs precision.transformer_impl=local and "
                         "model.attention_backend=sdpa (the per-document attention mask goes "
                         "through SDPA; TransformerEngine's THD packing is not wired up yet); "
                         "set data.pack_sequences=false for this model")


def _check_objective(cfg: AOTConfig, dp: Optional[int]) -> None:
    a, t = cfg.alignment, cfg.trainer
    spec = get_loss_spec(a.loss_type)
    if cfg.data.kind is not None:  # format=auto on one file: checked when the data are read
        check_data_kind(a.loss_type, cfg.data.kind, cfg.data.kind_source())
    # A loss that never sorts gains nothing from a wider sort scope but communication.
    if not spec.sorts and a.sort_scope == "global":
        raise ValueError(f"alignment.sort_scope=global costs an extra forward pass per step but "
                         f"{a.loss_type} never sorts; set alignment.sort_scope=micro")
    sort_size = sort_group_size(cfg, dp)
    if sort_size is not None and sort_size < 2:
        raise ValueError(
            f"alignment.sort_scope={a.sort_scope} with trainer.micro_batch_size="
            f"{t.micro_batch_size} sorts a single sample, which makes {a.loss_type} exactly DPO; "
            "raise trainer.micro_batch_size or use sort_scope=data_parallel/global")


def sort_group_size(cfg: AOTConfig, dp: Optional[int]) -> Optional[int]:
    """Samples (pairs, or sequences of unpaired data) one sort sees, or None when the loss never
    sorts or the size depends on a data-parallel size not known yet."""
    a, t = cfg.alignment, cfg.trainer
    if not get_loss_spec(a.loss_type).sorts or (a.sort_scope == "data_parallel" and dp is None):
        return None
    return {"micro": t.micro_batch_size, "global": t.global_batch_size,
            "data_parallel": t.micro_batch_size * (dp or 1)}[a.sort_scope]


def check_data_kind(loss_type: str, kind: str, source: str) -> None:
    """Refuse data of a kind the objective does not train on, naming both keys and the losses
    that fit (``source``: the keys or file that make the data that kind)."""
    spec = get_loss_spec(loss_type)
    if kind in spec.data_kinds:
        return
    fits = [name for name, s in LOSS_SPECS.items() if kind in s.data_kinds]
    raise ValueError(f"alignment.loss_type={loss_type} trains on {' or '.join(spec.data_kinds)} "
                     f"data, but {source} gives {kind} data; use alignment.loss_type="
                     f"{' or '.join(fits)} for it (or give {spec.data_kinds[0]} data)")


__all__ = ["check_rules", "check_data_kind", "sort_group_size"]
