"""Architecture options of newer families on top of megatron-core's GPT layer spec.

megatron-core expresses some of them itself, switched on from the TransformerConfig
(:func:`nemo_aot.models.config.to_transformer_config`): ``qk_layernorm`` (the spec supplies the
norm modules), ``layernorm_zero_centered_gamma`` (TE norms; our local RMSNorm reads it too),
``softmax_scale``, and sliding-window attention (``window_size`` with
``window_attn_skip_freq``: TE's attention and our SDPA attention mask by it). What it lacks is
added here, the smallest extension that carries the same parameters and state-dict names at
every layout:

* **post-sublayer norms** (Gemma 2/3): the attention output projection and the MLP's second
  linear layer carry a ``post_layernorm`` that normalizes their output before the residual add
  (``...linear_proj.post_layernorm.weight``, ``...linear_fc2.post_layernorm.weight``). Applied
  after LoRA wrapping, so an adapter's delta is added before the norm, as PEFT adds it to
  ``o_proj``/``down_proj`` before Gemma's post norms.
* **a RoPE base per layer kind** (Gemma 3): the model computes the global layers' rotary angles
  (``rotary_base``, with ``rope_scaling``) once; a sliding-window layer recovers the integer
  positions from them (angle of the first frequency / that frequency, rounded) and rotates with
  its own base (``rotary_base_local``). Stateless, so activation recomputation and every
  pipeline stage see the same angles, and bit-identical to computing them from positions.
* **an embedding scale** (Gemma): the input embedding output times sqrt(hidden_size), rounded to
  fp32 and then to the activation dtype as Hugging Face rounds it.

Which of these a model uses is stated by its GPTModelConfig (the family file sets them), so a
``.nemo`` rebuilds the same model anywhere. The TE variants (TENorm in the same places) are
written but only run where TransformerEngine is installed.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention

from nemo_aot.models.config import GPTModelConfig


# ----------------------------------------------------------------------------- post norms
class _PostNormMixin:
    """Put in front of a row-parallel linear class: its output passes ``post_layernorm``."""

    post_norm: type = None

    def __init__(self, input_size, output_size, *args, config, **kwargs):
        super().__init__(input_size, output_size, *args, config=config, **kwargs)
        self.post_layernorm = self.post_norm(config=config, hidden_size=output_size,
                                             eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        return self.post_layernorm(out), bias


_POST_NORM_CLASSES: dict = {}


def post_norm_class(base: type, norm: type) -> type:
    """``base`` whose output is normalized by ``norm`` (one class per pair)."""
    key = (base, norm)
    if key not in _POST_NORM_CLASSES:
        _POST_NORM_CLASSES[key] = type(f"PostNorm{base.__name__}", (_PostNormMixin, base),
                                       {"post_norm": norm})
    return _POST_NORM_CLASSES[key]


# ----------------------------------------------------------------------------- local RoPE
def rope_inv_freq(base: float, head_dim: int) -> torch.Tensor:
    """megatron-core's (and Hugging Face's) default inverse frequencies, fp32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def first_inv_freq(cfg: GPTModelConfig) -> float:
    """The first (highest) inverse frequency of the global layers: 1, divided by a linear
    scaling's factor (llama3 scaling keeps the highest frequencies)."""
    scaling = cfg.rope_scaling
    return 1.0 / scaling.factor if scaling is not None and scaling.rope_type == "linear" else 1.0


def local_rotary_emb(global_emb: torch.Tensor, global_inv0: float,
                     local_inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary angles of the same positions at the local base: global_emb [s, 1, 1, d] is
    megatron's non-interleaved cat(freqs, freqs) in fp32."""
    positions = torch.round(global_emb[..., :1].float() / global_inv0)
    freqs = positions * local_inv_freq.to(global_emb.device)
    return torch.cat((freqs, freqs), dim=-1).to(global_emb.dtype)


class LocalRopeSelfAttention(SelfAttention):
    """megatron's SelfAttention whose sliding-window layers rotate with their own RoPE base."""

    def __init__(self, *args, local_rotary_base: Optional[float] = None,
                 global_inv0: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        local = local_rotary_base is not None and is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, self.layer_number)
        self.global_inv0 = global_inv0
        # a non-persistent buffer: it moves to the rank's device with the module, and the
        # checkpoint keys stay megatron's
        self.register_buffer("local_inv_freq", rope_inv_freq(local_rotary_base, config.kv_channels)
                             if local else None, persistent=False)

    def forward(self, *args, rotary_pos_emb=None, **kwargs):
        if self.local_inv_freq is not None and isinstance(rotary_pos_emb, torch.Tensor):
            if self.config.rotary_interleaved:
                raise NotImplementedError("a local RoPE base with interleaved rotary")
            rotary_pos_emb = local_rotary_emb(rotary_pos_emb, self.global_inv0,
                                              self.local_inv_freq)
        return super().forward(*args, rotary_pos_emb=rotary_pos_emb, **kwargs)


# ----------------------------------------------------------------------------- the spec
def apply_layer_options(spec, cfg: GPTModelConfig, norm: type):
    """The layer spec with ``cfg``'s family options; ``norm`` is the spec's norm class (our
    RMSNorm on the local spec, TENorm on TE's). Returns ``spec`` itself when none apply."""
    if not (cfg.qk_layernorm or cfg.post_sublayer_norms or cfg.rotary_base_local is not None):
        return spec
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    if cfg.qk_layernorm:
        attention.submodules.q_layernorm = norm
        attention.submodules.k_layernorm = norm
    if cfg.rotary_base_local is not None:
        if attention.module is not SelfAttention:
            raise ValueError(f"model.rotary_base_local needs megatron's SelfAttention in the "
                             f"layer spec, not {attention.module.__name__}")
        attention.module = LocalRopeSelfAttention
        attention.params = {**(attention.params or {}),
                            "local_rotary_base": float(cfg.rotary_base_local),
                            "global_inv0": first_inv_freq(cfg)}
    if cfg.post_sublayer_norms:
        homes = ((attention.submodules, "linear_proj"), (spec.submodules.mlp.submodules,
                                                         "linear_fc2"))
        for home, name in homes:
            setattr(home, name, post_norm_class(getattr(home, name), norm))
    return spec


# ----------------------------------------------------------------------------- the model
class _ScaledEmbeddingMixin:
    embedding_scale: float = 1.0

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        # rounded through fp32 as transformers does
        scale = torch.tensor(self.embedding_scale, dtype=torch.float32, device=out.device)
        return out * scale.to(dtype=out.dtype)


_SCALED_CLASSES: dict = {}


def apply_model_options(model, cfg: GPTModelConfig) -> None:
    """Options on the built GPTModel: linear RoPE scaling of the global layers, the embedding
    scale. Parameters and state-dict keys stay megatron's."""
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.rope_type == "linear":
        model.rotary_pos_emb.inv_freq = model.rotary_pos_emb.inv_freq / scaling.factor
    embedding = getattr(model, "embedding", None)
    if cfg.scale_embeddings and embedding is not None:
        key = (type(embedding), cfg.hidden_size)
        if key not in _SCALED_CLASSES:
            _SCALED_CLASSES[key] = type(f"Scaled{key[0].__name__}",
                                        (_ScaledEmbeddingMixin, key[0]),
                                        {"embedding_scale": math.sqrt(cfg.hidden_size)})
        embedding.__class__ = _SCALED_CLASSES[key]


__all__ = ["apply_layer_options", "apply_model_options", "post_norm_class",
           "LocalRopeSelfAttention", "local_rotary_emb", "rope_inv_freq"]
