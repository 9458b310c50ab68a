"""Build megatron-core GPTModel chunks for this rank from a GPTModelConfig."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from nemo_aot.models.config import GPTModelConfig
from nemo_aot.models.family_options import apply_layer_options, apply_model_options
from nemo_aot.models.layer_specs import (
    RMSNorm,
    decoder_block_spec,
    local_layer_spec,
    te_layer_spec,
)
from nemo_aot.models.lora import apply_to_layer_spec, init_adapters
from nemo_aot.models.options import LINEAR_ATTENTION_LORA_TARGETS, PeftConfig


def build_model_chunks(model_cfg: GPTModelConfig, transformer_config,
                       transformer_impl: str = "local", peft: Optional[PeftConfig] = None,
                       seed: int = 1234) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage held by this rank (one without interleaving).
    With ``peft`` (scheme lora) the targeted linear layers carry fresh LoRA adapters, drawn
    from ``seed`` the same way at every layout (``nemo_aot.models.lora``)."""
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = range(vpp) if vpp else [None]
    chunks = [build_gpt_model(model_cfg, transformer_config, transformer_impl, vp_stage=s,
                              peft=peft) for s in stages]
    if peft is not None and peft.enabled:
        init_adapters(chunks, seed)
    return chunks


def build_gpt_model(model_cfg: GPTModelConfig, transformer_config,
                    transformer_impl: str = "local", vp_stage: Optional[int] = None,
                    peft: Optional[PeftConfig] = None):
    from megatron.core.models.gpt import GPTModel

    if transformer_impl == "local":
        layer_spec = local_layer_spec(model_cfg.attention_backend, model_cfg)
    elif transformer_impl == "transformer_engine":
        layer_spec = te_layer_spec(model_cfg)
    else:
        raise ValueError(f"model.transformer_impl must be 'local' or 'transformer_engine', "
                         f"got {transformer_impl!r}")
    if peft is not None:
        layer_spec = apply_to_layer_spec(layer_spec, peft)
    layer_spec = apply_layer_options(layer_spec, model_cfg, _norm_class(transformer_impl))
    block_spec = _block_spec(model_cfg, transformer_config, transformer_impl, layer_spec,
                             vp_stage, peft)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    scaling = model_cfg.rope_scaling
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=block_spec,
        vocab_size=model_cfg.padded_vocab_size(tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model_cfg.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=model_cfg.rotary_percent,
        rotary_base=model_cfg.rotary_base,
        vp_stage=vp_stage,
    )
    if post:
        # megatron builds its own ColumnParallelLinear; this instance gets the subclass that can
        # hand back its input instead of logits (same parameters and state-dict keys).
        model.output_layer.__class__ = HiddenStatesOutputLayer
    apply_model_options(model, model_cfg)
    if scaling is not None and scaling.rope_type == "llama3":
        rope = model.rotary_pos_emb
        # megatron's own Llama-3.1 scaling, with every parameter from the config (its GPTModel
        # constructor only forwards the factor and keeps the other three at Llama-3.1's values).
        rope.inv_freq = rope._apply_scaling(
            rope.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings)
    return model


def _norm_class(transformer_impl: str) -> type:
    if transformer_impl == "local":
        return RMSNorm
    from megatron.core.extensions.transformer_engine import TENorm

    return TENorm


def _block_spec(model_cfg: GPTModelConfig, transformer_config, transformer_impl: str,
                layer_spec, vp_stage: Optional[int], peft: Optional[PeftConfig]):
    """The decoder block: one layer spec repeated, or the hybrid linear-attention block."""
    if model_cfg.linear_attention is None:
        gdn = [t for t in (peft.target_modules if peft is not None and peft.enabled else [])
               if t in LINEAR_ATTENTION_LORA_TARGETS]
        if gdn:
            raise ValueError(f"peft.target_modules {gdn} name Gated DeltaNet layers, which this "
                             "model (model.linear_attention null) does not have; drop them")
        return decoder_block_spec(transformer_config, layer_spec, vp_stage)
    from nemo_aot.models.hybrid_spec import hybrid_block_spec

    if transformer_impl == "transformer_engine":
        # megatron-core's TE spec for it fuses the input norms into in_proj/linear_qkv and
        # zero-centres the GDN output norm: other checkpoint keys and values than ours.
        raise ValueError("model.linear_attention (Gated DeltaNet) is built on the local spec "
                         "only; set precision.transformer_impl=local")
    lora = None if peft is None else (lambda spec: apply_to_layer_spec(spec, peft))
    return hybrid_block_spec(transformer_config, model_cfg.attention_backend, vp_stage, lora)


class HiddenStatesOutputLayer(ColumnParallelLinear):
    """megatron's output layer, which under ``emit_hidden_states`` returns the final hidden
    states instead of logits: its input made whole over the TP group as the layer itself makes
    it (sequence-parallel all-gather, or the copy to the TP region whose backward sums the
    input gradient over TP), so that ``hidden_state_logprobs`` computes this rank's vocabulary
    slice of the log-probs from them and the weight without a [s, b, V] logits tensor."""

    emit_hidden_states = False

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.emit_hidden_states:
            return super().forward(input_, weight, runtime_gather_output)
        if self.sequence_parallel:
            whole = gather_from_sequence_parallel_region(input_, group=self.tp_group)
        else:
            whole = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return _ContiguousGrad.apply(whole), None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. GPTModel returns its output
    transposed to [b, s, ...], so the gradient reaching the output layer is a transposed view,
    and megatron's TP all-reduce (``_reduce``) reduces ``grad.contiguous()``, a copy, for a
    non-contiguous gradient: the sum would be lost (its linear layers never hand it one)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def gpt_of(chunk: torch.nn.Module):
    """The GPTModel inside a (DDP-)wrapped model chunk."""
    while not hasattr(chunk, "output_layer") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def output_weight(chunk: torch.nn.Module) -> torch.Tensor:
    """This rank's rows of the weight the output layer multiplies by (the tied embedding's
    when input and output embeddings are shared), on the last pipeline stage's chunk."""
    gpt = gpt_of(chunk)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def emit_hidden_states(chunk: torch.nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block, a forward of ``chunk`` returns [b, s, H] final hidden states in place
    of [b, s, V_r] logits (a no-op for chunks without the output layer, or with ``on`` false)."""
    layer = getattr(gpt_of(chunk), "output_layer", None)
    if not on or not isinstance(layer, HiddenStatesOutputLayer):
        yield
        return
    layer.emit_hidden_states = True
    try:
        yield
    finally:
        layer.emit_hidden_states = False
