"""The rules across sections of a run's config: each section checks its own fields
(``validate`` on each dataclass); what only holds between sections - the layout and the
batches, sequences and parallelism, the objective and the data, FP8, LoRA - is checked here,
once, by ``check_rules`` when ``nemo_aot.algorithms.resolve`` resolves a run. Every message
names the keys and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Iterator, Optional

from nemo_aot.algorithms.config import FP8_PAD_MULTIPLE, AOTConfig
from nemo_aot.losses import LOSS_SPECS, get_loss_spec


def check_rules(cfg: AOTConfig, world_size: Optional[int]) -> None:
    """Every section's own rules, then the rules across them, at ``world_size`` ranks (None:
    the rules that do not depend on it; data parallelism is then taken as 1)."""
    check_numbers(cfg)
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
    if data.pack_sequences and cfg.model.linear_attention is not None:
        raise ValueError("data.pack_sequences is not supported with model.linear_attention "
                         "(Gated DeltaNet): megatron-core's GatedDeltaNet takes no document "
                         "boundaries (it refuses packed sequences), so its recurrence and "
                         "convolution would run across documents; set data.pack_sequences=false")
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


# --------------------------------------------------------------------------- numbers


@dataclasses.dataclass(frozen=True)
class Range:
    """The one rule of a numeric key: finite, an integer where ``integer``, inside the bounds
    (``low``/``high`` inclusive unless ``*_open``), null only where ``nullable``."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    null_means: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        text = f"{kind} {' and '.join(bounds)}".strip()
        if self.nullable:
            text += f", or null{f' ({self.null_means})' if self.null_means else ''}"
        return text

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _count(low: int = 1, **kw: Any) -> Range:
    return Range(low=low, integer=True, **kw)


_POSITIVE = Range(low=0, low_open=True)
_NON_NEGATIVE = Range(low=0)
_UNIT_OPEN = Range(low=0, high=1, high_open=True)  # [0, 1)
_SEED = Range(low=0, high=2 ** 32 - 1, integer=True)

# One rule per numeric key of AOTConfig (a test walks the schema and fails on a numeric key
# without a rule). Cross-key rules (min_lr <= lr, heads dividing hidden, ...) stay with the
# sections and check_rules; these only say what one value may be on its own.
NUMBER_RULES: dict[str, Range] = {
    "model.num_layers": _count(),
    "model.hidden_size": _count(),
    "model.ffn_hidden_size": _count(),
    "model.num_attention_heads": _count(),
    "model.num_query_groups": _count(nullable=True, null_means="= num_attention_heads"),
    "model.kv_channels": _count(nullable=True, null_means="hidden_size / heads"),
    "model.vocab_size": _count(),
    "model.make_vocab_size_divisible_by": _count(),
    "model.encoder_seq_length": _count(),
    "model.max_position_embeddings": _count(),
    "model.rotary_base": _POSITIVE,
    "model.rotary_percent": Range(low=0, high=1, low_open=True),
    "model.rope_scaling.factor": Range(low=1),
    "model.rope_scaling.low_freq_factor": _POSITIVE,
    "model.rope_scaling.high_freq_factor": _POSITIVE,
    "model.rope_scaling.original_max_position_embeddings": _count(),
    "model.layernorm_epsilon": _POSITIVE,
    "model.init_method_std": _POSITIVE,
    "precision.fp8_amax_history_len": _count(),
    "parallel.tensor_model_parallel_size": _count(),
    "parallel.pipeline_model_parallel_size": _count(),
    "parallel.virtual_pipeline_model_parallel_size": _count(2, nullable=True,
                                                            null_means="no interleaving"),
    "data.max_seq_length": _count(2),
    "data.unpaired_positive_fraction": Range(low=0, high=1, low_open=True, high_open=True,
                                             nullable=True, null_means="as in the data"),
    "data.pad_to_multiple_of": _count(),
    "data.seed": _SEED,
    "alignment.beta": _POSITIVE,
    "alignment.label_smoothing": Range(low=0, high=0.5, high_open=True),
    "alignment.sft_loss_weight": _NON_NEGATIVE,
    "alignment.logprob_chunk_size": _count(),
    "alignment.reproduce_atol": _NON_NEGATIVE,
    "peft.rank": _count(),
    "peft.alpha": _POSITIVE,
    "peft.dropout": _UNIT_OPEN,
    "performance.recompute_num_layers": _count(nullable=True),
    "performance.ddp_bucket_size": _count(nullable=True, null_means="megatron's default"),
    "trainer.seed": _SEED,
    "trainer.max_steps": _count(nullable=True, null_means="run max_epochs"),
    "trainer.max_epochs": _count(nullable=True, null_means="run max_steps"),
    "trainer.global_batch_size": _count(),
    "trainer.micro_batch_size": _count(),
    "trainer.val_check_interval": _count(),
    "trainer.limit_val_batches": _count(nullable=True, null_means="the whole split"),
    "trainer.max_time_minutes": Range(low=0, low_open=True, nullable=True,
                                      null_means="no budget"),
    "trainer.grad_clip": _NON_NEGATIVE,
    "trainer.log_every_n_steps": _count(),
    "trainer.num_nodes": _count(),
    "trainer.devices": _count(nullable=True, null_means="from the launcher"),
    "optim.lr": _POSITIVE,
    "optim.min_lr": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.adam_beta1": _UNIT_OPEN,
    "optim.adam_beta2": _UNIT_OPEN,
    "optim.adam_eps": _POSITIVE,
    "optim.warmup_steps": _count(0),
    "checkpoint.save_interval": _count(0),
    "checkpoint.keep_last": _count(),
    "logging.peak_tflops": Range(low=0, low_open=True, nullable=True,
                                 null_means="look the GPU up"),
}

# What a value of 0 means where 0 is allowed and special (said in the message).
_ZERO_MEANS = {"trainer.grad_clip": "0 disables clipping",
               "checkpoint.save_interval": "0 saves only on signals, time budget and the end"}


# Numbers given outside the config (command-line options), by the same kind of rule.
OPTION_RULES: dict[str, Range] = {
    "--gpu-memory-gib": Range(low=0, low_open=True, high=1 << 20),  # `train --plan`
    "--micro-batch-size": _count(),  # `score`
    "--tp": _count(),
    "--pp": _count(),
    "--max-seq-length": _count(2, nullable=True, null_means="the model's encoder_seq_length"),
    "--step": _count(0, nullable=True, null_means="the newest complete step"),  # `export`
}


def check_option(name: str, value: Any) -> None:
    """A numeric command-line option against its rule in ``OPTION_RULES``."""
    rule = OPTION_RULES[name]
    if not rule.accepts(value):
        raise ValueError(f"{name} must be {rule.describe()}, got {value!r}")


def numeric_keys(schema: Any = None, prefix: str = "") -> Iterator[str]:
    """Dotted names of every int/float field of the schema (default AOTConfig), nested
    sections (also optional ones such as model.rope_scaling) included."""
    schema = AOTConfig if schema is None else schema
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)] \
            if typing.get_origin(kind) is typing.Union else [kind]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            yield from numeric_keys(inner[0], f"{prefix}{f.name}.")
        elif len(inner) == 1 and inner[0] in (int, float):
            yield f"{prefix}{f.name}"


def check_numbers(cfg: AOTConfig) -> None:
    """Every numeric key against its rule in ``NUMBER_RULES``: NaN, infinities, wrong signs
    and values out of range fail here, naming the key, the value and what it may be."""
    for key in numeric_keys(type(cfg)):
        rule = NUMBER_RULES.get(key)  # a key without a rule fails tests/unit, not a user's run
        *sections, name = key.split(".")
        node: Any = cfg
        for part in sections:
            node = getattr(node, part)
        if rule is None or node is None:  # an optional section that is off (rope_scaling)
            continue
        value = getattr(node, name)
        if not rule.accepts(value):
            zero = f"; {_ZERO_MEANS[key]}" if key in _ZERO_MEANS else ""
            raise ValueError(f"{key} must be {rule.describe()}{zero}, got {value!r}")


__all__ = ["check_rules", "check_data_kind", "sort_group_size", "check_numbers",
           "check_option", "numeric_keys", "NUMBER_RULES", "OPTION_RULES", "Range"]
