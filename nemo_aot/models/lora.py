"""LoRA adapters on megatron-core's tensor-parallel linear layers (Hu et al., arXiv 2106.09685).

An adapted layer computes ``y = W x + (alpha / r) * B (A dropout(x))`` with ``A`` [r, in] and
``B`` [out, r]; ``W`` is frozen. The adapter lives *inside* the layer it adapts: the layer
spec swaps megatron's class for a subclass (``lora_class``) that owns an ``adapter`` child, so
state-dict keys stay the base model's (``...linear_qkv.weight``) plus ``...linear_qkv.adapter.
linear_in.weight`` (A) and ``...adapter.linear_out.weight`` (B), and a base ``.nemo`` loads
into the adapted model unchanged.

Tensor parallelism: the adapter's output has exactly the TP sharding of the base layer's.

* Column-parallel base (``linear_qkv``, ``linear_fc1``; ``W`` split on its output rows): ``B``
  is split the same way, ``A`` replicated. ``t = A x`` is the same on every TP rank; its
  gradient from the local rows of ``B`` is partial, so ``t`` passes a copy-to-TP region
  (identity forward, all-reduce backward). Under sequence parallelism ``x`` holds this rank's
  slice of the sequence: ``t`` (r wide, not h) is all-gathered along the sequence (backward:
  reduce-scatter) and ``A``'s gradient, partial over the sequence, is summed over TP by
  megatron (``A.sequence_parallel``), as for the norms.
* Row-parallel base (``linear_proj``, ``linear_fc2``; ``W`` split on its input columns): ``A``
  is split on its columns, ``B`` replicated. ``A_k x_k`` are partial sums: all-reduced
  (sequence parallel: reduce-scattered along the sequence, as the base output is; then ``B``'s
  gradient is partial over the sequence and marked ``sequence_parallel``).
* Gated MLP: ``linear_fc1`` holds ``[gate_k; up_k]`` per TP rank and checkpoints as
  ``[gate; up]`` (megatron's swiglu factory). Its ``B`` rows follow the same interleaving and
  are checkpointed through the same factory, so the merged ``W + (alpha/r) B A`` has the
  layout the Hugging Face conversion splits into gate_proj/up_proj.

TransformerEngine layers are wrapped the same way; for the norm-fused column layers
(``TELayerNormColumnParallelLinear``) the adapter's input is the normalized activation, which
TE returns when ``return_layernorm_output`` is set.

Adapters are initialized as Hugging Face PEFT does (``A`` Kaiming-uniform, ``B`` zero), from a
generator seeded per (seed, layer, module): the same adapters at every TP/PP layout.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import mappings

from nemo_aot.models.options import LINEAR_ATTENTION_LORA_TARGETS, LORA_TARGETS, PeftConfig

COLUMN_TARGETS = ("linear_qkv", "linear_fc1", "in_proj")
SECTION_NAMES = ("query", "key", "value", "z", "beta", "alpha")
"""megatron GatedDeltaNet's names of the in_proj row sections (its checkpoint splits them)."""
GATED_TARGET = "linear_fc1"
ADAPTER = "adapter"
ADAPTER_KEY = f".{ADAPTER}."
MERGED = "lora_merged"
"""``metadata`` key of ``sharded_state_dict``: True gives the merged base weights and no
adapter entries (the policy as a plain model)."""


@dataclass(frozen=True)
class LoRAOptions:
    rank: int
    alpha: float
    dropout: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAAdapter(torch.nn.Module):
    """``(alpha / r) B (A dropout(x))`` with this rank's shards of A and B (see module doc)."""

    def __init__(self, target: str, in_local: int, out_local: int, options: LoRAOptions,
                 sequence_parallel: bool, gated: bool, dtype, device, tp_group=None,
                 sections: Optional[tuple[int, ...]] = None):
        super().__init__()
        self.target, self.options, self.gated = target, options, gated
        self.sections = sections
        """Global sizes of the row sections a column-parallel base holds per TP rank (Gated
        DeltaNet's in_proj: each rank has its slice of every section, in order)."""
        self.column = target in COLUMN_TARGETS
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group
        self.enabled = True
        factory = dict(dtype=dtype, device=device)
        self.linear_in = torch.nn.Linear(in_local, options.rank, bias=False, **factory)
        self.linear_out = torch.nn.Linear(options.rank, out_local, bias=False, **factory)
        with torch.no_grad():
            self.linear_out.weight.zero_()
        sharded, replicated = ((self.linear_out.weight, self.linear_in.weight) if self.column
                               else (self.linear_in.weight, self.linear_out.weight))
        # The grad norm counts a TP-sharded parameter on every rank, a replicated one once.
        tensor_parallel.set_tensor_model_parallel_attributes(
            sharded, is_parallel=True, dim=0 if self.column else 1, stride=1)
        # Replicated, but its gradient is partial over the sequence: megatron sums it over TP.
        replicated.sequence_parallel = sequence_parallel

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.options.dropout
        if not self.training or p == 0:
            return x
        if self.column and not self.sequence_parallel:
            return F.dropout(x, p)  # x is the same on every TP rank: so is its mask
        with tensor_parallel.get_cuda_rng_tracker().fork():  # x differs per TP rank
            return F.dropout(x, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Through the child modules, not their weights: megatron's DDP waits for a parameter's
        # deferred all-gather (overlap_param_gather) in a forward pre-hook of its own module.
        t = self.linear_in(self._dropout(x))
        group = self.tp_group
        if self.column:
            t = (mappings.gather_from_sequence_parallel_region(t, True, group=group)
                 if self.sequence_parallel
                 else mappings.copy_to_tensor_model_parallel_region(t, group=group))
        else:
            t = (mappings.reduce_scatter_to_sequence_parallel_region(t, group=group)
                 if self.sequence_parallel
                 else mappings.reduce_from_tensor_model_parallel_region(t, group=group))
        return self.linear_out(t) * self.options.scale

    def delta(self) -> torch.Tensor:
        """This rank's shard of ``(alpha / r) B A`` in fp32: the TP shard of the base weight it
        adds to (column: B's rows times all of A; row: all of B times A's columns)."""
        b, a = (w.detach().float() for w in (self.linear_out.weight, self.linear_in.weight))
        return (b @ a) * self.options.scale

    def sharded_state_dict(self, prefix: str, sharded_offsets=(), metadata=None) -> dict:
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axis = {"linear_out.weight": 0} if self.column else {"linear_in.weight": 1}
        dp_cp_group = (metadata or {}).get("dp_cp_group") or \
            parallel_state.get_data_parallel_group(with_context_parallel=True)
        tp_group = self.tp_group or parallel_state.get_tensor_model_parallel_group()
        state = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets,
            tp_group=tp_group, dp_cp_group=dp_cp_group)
        if self.gated:
            key = f"{prefix}linear_out.weight"
            state[key] = apply_swiglu_sharded_factory(state[key], sharded_offsets)
        if self.sections:
            try:  # megatron-core 0.16-0.18; 0.19 moved it to ssm.utils
                from megatron.core.ssm.gated_delta_net import _split_tensor_factory
            except ImportError:
                from megatron.core.ssm.utils import _split_tensor_factory

            key, tp = f"{prefix}linear_out.weight", tp_group.size()
            state[key] = _split_tensor_factory(state[key], [n // tp for n in self.sections],
                                               list(SECTION_NAMES), 0)
        return state


def _split_output(output, x: torch.Tensor, norm_fused: bool):
    """(output, bias, adapter input) from a megatron linear layer's return value: (out, bias);
    a norm-fused TE layer returning its normalized input gives ((out, ln_out), bias) or
    (out, bias, ln_out)."""
    if len(output) == 3:
        return output
    out, bias = output
    if norm_fused:
        out, ln_out = out
        return out, bias, ln_out
    return out, bias, x


class _LoRALinearMixin:
    """Added in front of a megatron linear layer class by ``lora_class``."""

    lora_target: str = ""
    lora_options: Optional[LoRAOptions] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # TE's norm-fused linear returns the normalized input when asked: the adapter's input.
        self.lora_norm_fused = hasattr(self, "return_layernorm_output")
        if self.lora_norm_fused:
            self.return_layernorm_output = True
        out_local, in_local = self.weight.shape
        config = self.config
        self.adapter = LoRAAdapter(
            self.lora_target, in_local, out_local, self.lora_options,
            sequence_parallel=bool(config.sequence_parallel),
            gated=self.lora_target == GATED_TARGET and config.gated_linear_unit,
            dtype=config.params_dtype, device=self.weight.device,
            tp_group=getattr(self, "tp_group", None),
            sections=_in_proj_sections(config) if self.lora_target == "in_proj" else None)

    def forward(self, x, *args, **kwargs):
        out, bias, adapter_input = _split_output(super().forward(x, *args, **kwargs), x,
                                                 self.lora_norm_fused)
        if self.adapter.enabled:
            out = out + self.adapter(adapter_input)
        return out, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        adapter_prefix = f"{prefix}{ADAPTER}."
        state = {k: v for k, v in state.items() if not k.startswith(adapter_prefix)}
        if (metadata or {}).get(MERGED):
            key = f"{prefix}weight"
            merged = (self.weight.detach().float() + self.adapter.delta()).to(self.weight.dtype)
            state[key] = _with_data(state[key], merged)
            return state
        state.update(self.adapter.sharded_state_dict(adapter_prefix, sharded_offsets, metadata))
        return state


def _in_proj_sections(config) -> tuple[int, ...]:
    """GatedDeltaNet in_proj rows: q, k, v, gate, beta, alpha (TransformerConfig linear_*)."""
    qk = config.linear_num_key_heads * config.linear_key_head_dim
    v = config.linear_num_value_heads * config.linear_value_head_dim
    heads = config.linear_num_value_heads
    return (qk, qk, v, v, heads, heads)


def _with_data(entry, data: torch.Tensor):
    """A ShardedTensor (or factory) entry of the same key and placement holding ``data``."""
    import dataclasses

    return dataclasses.replace(entry, data=data)


_CLASSES: dict = {}


def lora_class(base: type, target: str, options: LoRAOptions) -> type:
    """``base`` (a megatron or TE linear layer class) with a LoRA adapter; one class per
    (base, target, options), so isinstance checks against ``base`` still hold."""
    key = (base, target, options)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"LoRA{base.__name__}", (_LoRALinearMixin, base),
                             {"lora_target": target, "lora_options": options})
    return _CLASSES[key]


def _submodules_of(entry):
    """The submodules of one entry of a layer spec: a ``ModuleSpec``'s ``submodules``, or the
    ``submodules=`` keyword of a factory (megatron-core 0.18 builds the MLP entry as
    ``functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))``)."""
    while isinstance(entry, functools.partial):
        if "submodules" in entry.keywords:
            return entry.keywords["submodules"]
        entry = entry.func
    submodules = getattr(entry, "submodules", None)
    if submodules is None:
        raise ValueError(f"peft: cannot find the linear layers of this layer spec's {entry!r} "
                         "(neither a ModuleSpec nor a partial with submodules=)")
    return submodules


def apply_to_layer_spec(spec, peft: PeftConfig):
    """The layer spec with the targeted linear layers swapped for their LoRA classes."""
    import copy

    if not peft.enabled:
        return spec
    spec = copy.deepcopy(spec)
    options = LoRAOptions(peft.rank, float(peft.alpha), float(peft.dropout))
    attention, mlp = (_submodules_of(spec.submodules.self_attention),
                      _submodules_of(spec.submodules.mlp))
    mixer = LINEAR_ATTENTION_LORA_TARGETS if hasattr(attention, "in_proj") else \
        ("linear_qkv", "linear_proj")
    homes = {**{t: attention for t in mixer}, "linear_fc1": mlp, "linear_fc2": mlp}
    for target in peft.target_modules:
        home = homes.get(target)
        if home is None:  # this kind of layer has no such module (e.g. in_proj in attention)
            continue
        base = getattr(home, target)
        if not isinstance(base, type):
            raise ValueError(f"peft.target_modules: {target} of this layer spec is "
                             f"{base!r}, not a linear layer class LoRA can wrap")
        setattr(home, target, lora_class(base, target, options))
    return spec


# ----------------------------------------------------------------------------- the model
def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(module, "module", None), torch.nn.Module):  # DDP, Float16Module
        module = module.module
    return module


def adapted_layers(chunks: Sequence[torch.nn.Module]) -> Iterator[tuple[int, str, object]]:
    """(global layer number, 1-based; target; layer module) of every adapted linear layer."""
    for chunk in chunks:
        decoder = getattr(_unwrap(chunk), "decoder", None)
        for layer in (decoder.layers if decoder is not None else []):
            for module in layer.modules():
                if isinstance(module, _LoRALinearMixin):
                    yield layer.layer_number, module.lora_target, module


def is_adapter_name(name: str) -> bool:
    return ADAPTER_KEY in f".{name}"


def freeze_base(chunks: Sequence[torch.nn.Module]) -> int:
    """Only adapter parameters train; returns how many elements they hold on this rank."""
    trainable = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(is_adapter_name(name))
            trainable += param.numel() if param.requires_grad else 0
    return trainable


def init_adapters(chunks: Sequence[torch.nn.Module], seed: int) -> None:
    """A Kaiming-uniform (PEFT's ``kaiming_uniform_(a=sqrt(5))``: bound 1/sqrt(in)), B zero,
    drawn whole from a generator per (seed, layer, target) and sliced to this rank's shard."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for layer_number, target, module in adapted_layers(chunks):
        adapter = module.adapter
        rank, in_local = adapter.linear_in.weight.shape
        fan_in = in_local if adapter.column else in_local * tp
        generator = torch.Generator().manual_seed(_adapter_seed(seed, layer_number, target))
        bound = 1.0 / math.sqrt(fan_in)
        # Drawn on the host (a CPU generator: the same numbers on every machine), then copied.
        full = torch.empty(rank, fan_in, device="cpu").uniform_(-bound, bound,
                                                                generator=generator)
        local = full if adapter.column else full.chunk(tp, dim=1)[tp_rank]
        with torch.no_grad():
            adapter.linear_in.weight.copy_(local)
            adapter.linear_out.weight.zero_()


def _adapter_seed(seed: int, layer_number: int, target: str) -> int:
    if target in LORA_TARGETS:
        return seed * 1_000_003 + layer_number * len(LORA_TARGETS) + LORA_TARGETS.index(target)
    return seed * 1_000_003 + 500_000 + layer_number * len(LINEAR_ATTENTION_LORA_TARGETS) + \
        LINEAR_ATTENTION_LORA_TARGETS.index(target)


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]):
    """The base model: every adapter switched off inside the ``with`` (same forward code)."""
    adapters = [module.adapter for _, _, module in adapted_layers(chunks)]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def adapter_sharded_state_dict(state: dict) -> dict:
    """The adapter entries of a (possibly nested) sharded state dict."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            sub = adapter_sharded_state_dict(value)
            if sub:
                out[key] = sub
        elif is_adapter_name(key):
            out[key] = value
    return out


# ----------------------------------------------------------------------------- full tensors
def _tp_gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.contiguous(),
                                 group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def full_adapters(chunks: Sequence[torch.nn.Module]) -> dict[tuple[int, str], tuple]:
    """{(layer index from 0, target): (A, B)} of every layer, whole (TP=1 layout, fc1's B as
    [gate; up]), as host tensors on global rank 0 ({} elsewhere). Collective: every rank."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for layer_number, target, module in adapted_layers(chunks):
        a, b = (w.detach() for w in (module.adapter.linear_in.weight,
                                     module.adapter.linear_out.weight))
        if module.adapter.column:
            b = _tp_gather(b, 0)
            if module.adapter.gated:  # [g0; u0; g1; u1] -> [g0; g1; u0; u1]
                parts = b.chunk(2 * tp, dim=0)
                b = torch.cat(parts[0::2] + parts[1::2], dim=0)
            elif module.adapter.sections:  # per rank [q_k; k_k; ...] -> [q; k; ...]
                local_sizes = [n // tp for n in module.adapter.sections]
                ranks = [r.split(local_sizes, dim=0) for r in b.chunk(tp, dim=0)]
                b = torch.cat([r[j] for j in range(len(local_sizes)) for r in ranks], dim=0)
        else:
            a = _tp_gather(a, 1)
        local[(layer_number - 1, target)] = (a.cpu(), b.cpu())
    if (parallel_state.get_tensor_model_parallel_rank() != 0
            or parallel_state.get_data_parallel_rank() != 0):
        return {}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        torch.distributed.all_gather_object(
            box, local, group=parallel_state.get_pipeline_model_parallel_group())
        local = {k: v for stage in box for k, v in stage.items()}
    return local if torch.distributed.get_rank() == 0 else {}


def load_full_adapters(chunks: Sequence[torch.nn.Module],
                       adapters: dict[tuple[int, str], tuple], source: str) -> None:
    """Copy whole (A, B) per (layer index from 0, target) into this rank's shards."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    k = parallel_state.get_tensor_model_parallel_rank()
    for layer_number, target, module in adapted_layers(chunks):
        found = adapters.get((layer_number - 1, target))
        if found is None:
            raise ValueError(f"{source} holds no adapter for layer {layer_number - 1} "
                             f"{target}; it was trained with other peft.target_modules")
        a, b = found
        adapter = module.adapter
        if adapter.column:
            if adapter.gated:
                gate, up = b.chunk(2, dim=0)
                b = torch.cat([gate.chunk(tp)[k], up.chunk(tp)[k]], dim=0)
            elif adapter.sections:
                b = torch.cat([part.chunk(tp)[k] for part in b.split(list(adapter.sections))],
                              dim=0)
            else:
                b = b.chunk(tp, dim=0)[k]
        else:
            a = a.chunk(tp, dim=1)[k]
        for dest, value, name in ((adapter.linear_in.weight, a, "A"),
                                  (adapter.linear_out.weight, b, "B")):
            if tuple(value.shape) != tuple(dest.shape):
                raise ValueError(f"{source}: layer {layer_number - 1} {target} {name} has shape "
                                 f"{tuple(value.shape)} at this layout, the model needs "
                                 f"{tuple(dest.shape)} (another rank or model?)")
            with torch.no_grad():
                dest.copy_(value)


__all__ = ["LoRAAdapter", "LoRAOptions", "lora_class", "apply_to_layer_spec", "adapted_layers",
           "freeze_base", "init_adapters", "adapters_disabled", "adapter_sharded_state_dict",
           "full_adapters", "load_full_adapters", "is_adapter_name", "MERGED", "COLUMN_TARGETS"]
