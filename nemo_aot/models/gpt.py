"""Build megatron-core GPTModel chunks for this rank from a GPTModelConfig."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from nemo_aot.models.config import GPTModelConfig
from nemo_aot.models.layer_specs import decoder_block_spec, local_layer_spec, te_layer_spec
from nemo_aot.models.lora import apply_to_layer_spec, init_adapters
from nemo_aot.models.options import PeftConfig


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
        layer_spec = local_layer_spec(model_cfg.attention_backend)
    elif transformer_impl == "transformer_engine":
        layer_spec = te_layer_spec()
    else:
        raise ValueError(f"model.transformer_impl must be 'local' or 'transformer_engine', "
                         f"got {transformer_impl!r}")
    if peft is not None:
        layer_spec = apply_to_layer_spec(layer_spec, peft)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    scaling = model_cfg.rope_scaling
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=decoder_block_spec(transformer_config, layer_spec, vp_stage),
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
    if scaling is not None:
        rope = model.rotary_pos_emb
        # megatron's own Llama-3.1 scaling, with every parameter from the config (its GPTModel
        # constructor only forwards the factor and keeps the other three at Llama-3.1's values).
        rope.inv_freq = rope._apply_scaling(
            rope.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings)
    return model
