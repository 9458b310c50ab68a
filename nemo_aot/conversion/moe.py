"""Mixture-of-experts families: Qwen3-MoE (``Qwen3MoeForCausalLM``) and Mixtral
(``MixtralForCausalLM``) - config translation, tensor name tables and shapes, self-contained so
that a family file of the conversion registry imports it whole.

Both keep the Llama attention and norms (Qwen3-MoE adds per-head query/key RMSNorms and its own
head_dim) and replace every layer's MLP by a softmax router over ``E`` SwiGLU experts with top-k
routing. Their routers agree with megatron-core's: Mixtral takes the softmax over the top-k
logits (= the softmax over all experts renormalized over the top k); Qwen3-MoE does the same
with ``norm_topk_prob: true`` and keeps the un-renormalized softmax weights with ``false``
(megatron's pre-softmax). Tensor names are the Hugging Face checkpoint's (one tensor per expert
and projection, as ``save_pretrained`` writes them and the hub holds them); megatron's full
TP=1/EP=1 state dict names each expert ``mlp.experts.local_experts.{j}``, and a dist checkpoint
reshards them over any expert-parallel layout.

Anything the families carry that megatron-core cannot compute the same way is refused, naming
the field: Qwen3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1), shared
experts (neither family has one), sliding windows, attention bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_aot.conversion.engine import Mapping

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."
_EXPERT = _M + "mlp.experts.local_experts.{j}."


@dataclass(frozen=True)
class MoEFamily:
    """One mixture-of-experts Hugging Face class: where its router and experts live."""

    hf_class: str
    model_type: str
    router: str
    """The router's weight, under the layer (``{i}``)."""
    expert: str
    """One expert's prefix, under the layer (``{j}`` = expert index)."""
    gate: str
    up: str
    down: str
    qk_norm: bool
    """Per-head RMSNorm on queries and keys (q_norm / k_norm)."""

    def mappings(self, experts: int) -> list[Mapping]:
        """The MLP part of the table for one layer template (``{i}``), experts expanded."""
        table = [Mapping((_L + self.router,), _M + "mlp.router.weight")]
        for j in range(experts):
            hf = _L + self.expert.replace("{j}", str(j))
            mc = _EXPERT.replace("{j}", str(j))
            table.append(Mapping((hf + self.gate, hf + self.up), mc + "linear_fc1.weight",
                                 "gate_up"))
            table.append(Mapping((hf + self.down,), mc + "linear_fc2.weight"))
        if self.qk_norm:
            table += [Mapping((_L + "self_attn.q_norm.weight",),
                              _M + "self_attention.q_layernorm.weight"),
                      Mapping((_L + "self_attn.k_norm.weight",),
                              _M + "self_attention.k_layernorm.weight")]
        return table

    def shapes(self, cfg) -> dict[str, tuple[int, ...]]:
        """Hugging Face shapes of the MLP part (name templates, ``{i}`` = layer)."""
        h, f, e = cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.num_moe_experts
        out = {_L + self.router: (e, h)}
        for j in range(e):
            hf = _L + self.expert.replace("{j}", str(j))
            out.update({hf + self.gate: (f, h), hf + self.up: (f, h), hf + self.down: (h, f)})
        if self.qk_norm:
            out.update({_L + "self_attn.q_norm.weight": (cfg.head_dim,),
                        _L + "self_attn.k_norm.weight": (cfg.head_dim,)})
        return out

    def config_fields(self, hf: dict, source: str) -> dict[str, Any]:
        """GPTModelConfig fields of the experts from a config.json dict (refusing what cannot
        be represented)."""
        return _CONFIG_FIELDS[self.hf_class](hf, source)

    def export_fields(self, cfg) -> dict[str, Any]:
        """config.json fields of the experts for ``cfg``."""
        where = f"exporting as {self.hf_class}"
        if cfg.moe_shared_expert_intermediate_size is not None:
            _refuse(where, "moe_shared_expert_intermediate_size",
                    cfg.moe_shared_expert_intermediate_size, f"{self.hf_class} has no shared "
                    "expert")
        if cfg.moe_router_score_function != "softmax" or cfg.moe_router_topk_scaling_factor:
            _refuse(where, "moe_router_score_function", cfg.moe_router_score_function,
                    f"{self.hf_class} routes by softmax without scaling")
        if cfg.qk_layernorm != self.qk_norm:
            _refuse(where, "qk_layernorm", cfg.qk_layernorm, f"{self.hf_class} has "
                    f"qk_layernorm={self.qk_norm}")
        if self.hf_class == MIXTRAL.hf_class:
            if not cfg.moe_router_topk_normalize:
                _refuse(where, "moe_router_topk_normalize", False, "Mixtral always "
                        "renormalizes its top-k weights")
            return {"num_local_experts": cfg.num_moe_experts,
                    "num_experts_per_tok": cfg.moe_router_topk,
                    "intermediate_size": cfg.expert_ffn_hidden_size,
                    "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
                    "output_router_logits": False, "sliding_window": None}
        return {"num_experts": cfg.num_moe_experts, "num_experts_per_tok": cfg.moe_router_topk,
                "moe_intermediate_size": cfg.expert_ffn_hidden_size,
                "norm_topk_prob": cfg.moe_router_topk_normalize, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
                "output_router_logits": False, "use_sliding_window": False,
                "sliding_window": None, "attention_bias": False}


def _refuse(source: str, key: str, value: Any, why: str) -> None:
    raise ValueError(f"{source}: {key}={value!r} is not supported: {why}")


def _positive(hf: dict, key: str, source: str) -> int:
    value = hf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


def _qwen3_moe_fields(hf: dict, source: str) -> dict[str, Any]:
    if hf.get("mlp_only_layers"):
        _refuse(source, "mlp_only_layers", hf["mlp_only_layers"], "dense layers between MoE "
                "layers are not supported (every layer must be a mixture of experts)")
    if hf.get("decoder_sparse_step", 1) != 1:
        _refuse(source, "decoder_sparse_step", hf["decoder_sparse_step"], "MoE on every "
                "layer only (decoder_sparse_step=1)")
    if hf.get("attention_bias"):
        _refuse(source, "attention_bias", True, "Qwen3-MoE attention has no bias")
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        _refuse(source, "use_sliding_window", True, "sliding-window attention is not "
                "implemented for this family")
    # transformers 4.x and the hub write num_experts; 5.x writes num_local_experts
    key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    return dict(num_moe_experts=_positive(hf, key, source),
                moe_router_topk=_positive(hf, "num_experts_per_tok", source),
                moe_ffn_hidden_size=_positive(hf, "moe_intermediate_size", source),
                moe_router_topk_normalize=bool(hf.get("norm_topk_prob", False)),
                qk_layernorm=True)


def _mixtral_fields(hf: dict, source: str) -> dict[str, Any]:
    window = hf.get("sliding_window")
    if window is not None and window < (hf.get("max_position_embeddings") or 0):
        _refuse(source, "sliding_window", window, "sliding-window attention shorter than "
                "max_position_embeddings is not implemented")
    return dict(num_moe_experts=_positive(hf, "num_local_experts", source),
                moe_router_topk=_positive(hf, "num_experts_per_tok", source),
                moe_ffn_hidden_size=_positive(hf, "intermediate_size", source),
                moe_router_topk_normalize=True)


QWEN3_MOE = MoEFamily("Qwen3MoeForCausalLM", "qwen3_moe", "mlp.gate.weight",
                      "mlp.experts.{j}.", "gate_proj.weight", "up_proj.weight",
                      "down_proj.weight", qk_norm=True)
MIXTRAL = MoEFamily("MixtralForCausalLM", "mixtral", "block_sparse_moe.gate.weight",
                    "block_sparse_moe.experts.{j}.", "w1.weight", "w3.weight", "w2.weight",
                    qk_norm=False)
_CONFIG_FIELDS = {QWEN3_MOE.hf_class: _qwen3_moe_fields, MIXTRAL.hf_class: _mixtral_fields}
MOE_FAMILIES = {f.hf_class: f for f in (QWEN3_MOE, MIXTRAL)}

__all__ = ["MoEFamily", "QWEN3_MOE", "MIXTRAL", "MOE_FAMILIES"]


# ------------------------------------------------------------------------- whole-model tables
def model_config_from_hf(hf: dict, source: str = "config.json"):
    """(family, GPTModelConfig) of a Qwen3-MoE or Mixtral config.json, read by its registry
    family (``nemo_aot.conversion.families``)."""
    from nemo_aot.conversion.families import family_for_hf

    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in MOE_FAMILIES:
        raise ValueError(f"{source}: architectures={names!r} is not a mixture-of-experts family "
                         f"here; supported are {sorted(MOE_FAMILIES)}")
    return MOE_FAMILIES[names[0]], family_for_hf(hf, source).config_from_hf(hf, source)


def mappings(cfg, family: MoEFamily) -> list[Mapping]:
    """The whole tensor table of a mixture-of-experts model (``{i}`` = layer)."""
    from nemo_aot.conversion.families import base

    return [base.EMBEDDING, base.FINAL_NORM, *base.LLAMA_NORMS, *base.ATTENTION,
            *family.mappings(cfg.num_moe_experts), base.output_mapping(cfg)]


def hf_shapes(cfg, family: MoEFamily) -> dict[str, tuple[int, ...]]:
    from nemo_aot.conversion.families import base

    shapes = {k: v for k, v in base.llama_shapes(cfg).items() if ".mlp." not in k}
    shapes.update(family.shapes(cfg))
    return shapes


def hf_config_from_model(cfg, family: MoEFamily, torch_dtype: str) -> dict:
    """config.json of ``cfg`` as ``family`` (transformers 4.x spelling)."""
    from nemo_aot.conversion import families

    return families.hf_config_from_model(cfg, families.REGISTRY[family.hf_class], torch_dtype)


__all__ += ["model_config_from_hf", "mappings", "hf_shapes", "hf_config_from_model"]
