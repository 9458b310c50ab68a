"""Mixture-of-experts families: Qwen3-MoE (``Qwen3MoeForCausalLM``) and Mixtral
(``MixtralForCausalLM``) - config translation, tensor name tables and shapes, self-contained so
that a family file of the conversion registry imports it whole - and the expert part of
Qwen3.5-MoE (``Qwen3_5MoeForCausalLM``, whose layers are Qwen3.5's: see
``families/qwen3_5_moe.py``).

Both keep the Llama attention and norms (Qwen3-MoE adds per-head query/key RMSNorms and its own
head_dim) and replace every layer's MLP by a softmax router over ``E`` SwiGLU experts with top-k
routing. Their routers agree with megatron-core's: Mixtral takes the softmax over the top-k
logits (= the softmax over all experts renormalized over the top k); Qwen3-MoE does the same
with ``norm_topk_prob: true`` and keeps the un-renormalized softmax weights with ``false``
(megatron's pre-softmax). Tensor names are the Hugging Face checkpoint's (one tensor per expert
and projection, as ``save_pretrained`` writes them and the hub holds them); megatron's full
TP=1/EP=1 state dict names each expert ``mlp.experts.local_experts.{j}``, and a dist checkpoint
reshards them over any expert-parallel layout.

Qwen3.5-MoE routes like Qwen3-MoE with ``norm_topk_prob`` always on (transformers'
``Qwen3_5MoeTopKRouter``: softmax over all experts in fp32, top k, renormalized) and adds a shared
expert on every token scaled by sigmoid(``shared_expert_gate`` . x): megatron's
``SharedExpertMLP`` with ``moe_shared_expert_gate`` (its ``gate_weight`` [1, hidden]).

Anything the families carry that megatron-core cannot compute the same way is refused, naming
the field: Qwen3-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step`` > 1), shared
experts (neither Qwen3-MoE nor Mixtral has one), sliding windows, attention bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from nemo_aot.conversion.engine import Mapping

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."


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
    shared_expert: Optional[str] = None
    """The shared expert's prefix under the layer (its gate/up/down named like an expert's),
    or None."""
    shared_gate: Optional[str] = None
    """The shared expert's sigmoid gate weight [1, hidden] under the layer, or None."""

    def mappings(self, experts: int, hf_layer: str = _L, mc_layer: str = _M) -> list[Mapping]:
        """The MLP part of the table for one layer (by default the template ``{i}``), experts
        expanded; ``hf_layer``/``mc_layer`` name a layer's prefixes on either side."""
        table = [Mapping((hf_layer + self.router,), mc_layer + "mlp.router.weight")]
        for j in range(experts):
            hf = hf_layer + self.expert.replace("{j}", str(j))
            mc = f"{mc_layer}mlp.experts.local_experts.{j}."
            table.append(Mapping((hf + self.gate, hf + self.up), mc + "linear_fc1.weight",
                                 "gate_up"))
            table.append(Mapping((hf + self.down,), mc + "linear_fc2.weight"))
        if self.shared_expert is not None:
            hf, mc = hf_layer + self.shared_expert, mc_layer + "mlp.shared_experts."
            table.append(Mapping((hf + self.gate, hf + self.up), mc + "linear_fc1.weight",
                                 "gate_up"))
            table.append(Mapping((hf + self.down,), mc + "linear_fc2.weight"))
        if self.shared_gate is not None:
            table.append(Mapping((hf_layer + self.shared_gate,),
                                 mc_layer + "mlp.shared_experts.gate_weight"))
        if self.qk_norm:
            table += [Mapping((hf_layer + "self_attn.q_norm.weight",),
                              mc_layer + "self_attention.q_layernorm.weight"),
                      Mapping((hf_layer + "self_attn.k_norm.weight",),
                              mc_layer + "self_attention.k_layernorm.weight")]
        return table

    def shapes(self, cfg, hf_layer: str = _L) -> dict[str, tuple[int, ...]]:
        """Hugging Face shapes of the MLP part (name templates, ``{i}`` = layer)."""
        h, f, e = cfg.hidden_size, cfg.expert_ffn_hidden_size, cfg.num_moe_experts
        out = {hf_layer + self.router: (e, h)}
        for j in range(e):
            hf = hf_layer + self.expert.replace("{j}", str(j))
            out.update({hf + self.gate: (f, h), hf + self.up: (f, h), hf + self.down: (h, f)})
        if self.shared_expert is not None:
            hf, s = hf_layer + self.shared_expert, cfg.moe_shared_expert_intermediate_size
            out.update({hf + self.gate: (s, h), hf + self.up: (s, h), hf + self.down: (h, s)})
        if self.shared_gate is not None:
            out[hf_layer + self.shared_gate] = (1, h)
        if self.qk_norm:
            out.update({hf_layer + "self_attn.q_norm.weight": (cfg.head_dim,),
                        hf_layer + "self_attn.k_norm.weight": (cfg.head_dim,)})
        return out

    def config_fields(self, hf: dict, source: str) -> dict[str, Any]:
        """GPTModelConfig fields of the experts from a config.json dict (refusing what cannot
        be represented)."""
        return _CONFIG_FIELDS[self.hf_class](hf, source)

    def export_fields(self, cfg) -> dict[str, Any]:
        """config.json fields of the experts for ``cfg``."""
        where = f"exporting as {self.hf_class}"
        if self.shared_expert is None and cfg.moe_shared_expert_intermediate_size is not None:
            _refuse(where, "moe_shared_expert_intermediate_size",
                    cfg.moe_shared_expert_intermediate_size, f"{self.hf_class} has no shared "
                    "expert")
        if self.shared_expert is not None and cfg.moe_shared_expert_intermediate_size is None:
            _refuse(where, "moe_shared_expert_intermediate_size", None, f"{self.hf_class} has a "
                    "shared expert on every layer")
        if bool(self.shared_gate) != cfg.moe_shared_expert_gate:
            _refuse(where, "moe_shared_expert_gate", cfg.moe_shared_expert_gate,
                    f"{self.hf_class} has moe_shared_expert_gate={bool(self.shared_gate)}")
        if cfg.moe_router_score_function != "softmax" or cfg.moe_router_topk_scaling_factor:
            _refuse(where, "moe_router_score_function", cfg.moe_router_score_function,
                    f"{self.hf_class} routes by softmax without scaling")
        # Qwen3.5-MoE's query/key norms belong to its attention layers (the family file)
        if self.hf_class != QWEN3_5_MOE.hf_class and cfg.qk_layernorm != self.qk_norm:
            _refuse(where, "qk_layernorm", cfg.qk_layernorm, f"{self.hf_class} has "
                    f"qk_layernorm={self.qk_norm}")
        always_renormalizes = {MIXTRAL.hf_class: "Mixtral", QWEN3_5_MOE.hf_class: "Qwen3.5-MoE"}
        if self.hf_class in always_renormalizes and not cfg.moe_router_topk_normalize:
            _refuse(where, "moe_router_topk_normalize", False,
                    f"{always_renormalizes[self.hf_class]} always renormalizes its top-k weights")
        if self.hf_class == MIXTRAL.hf_class:
            return {"num_local_experts": cfg.num_moe_experts,
                    "num_experts_per_tok": cfg.moe_router_topk,
                    "intermediate_size": cfg.expert_ffn_hidden_size,
                    "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
                    "output_router_logits": False, "sliding_window": None}
        if self.hf_class == QWEN3_5_MOE.hf_class:
            return {"num_experts": cfg.num_moe_experts,
                    "num_experts_per_tok": cfg.moe_router_topk,
                    "moe_intermediate_size": cfg.expert_ffn_hidden_size,
                    "shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size,
                    "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
                    "output_router_logits": False}
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


def _qwen3_5_moe_fields(hf: dict, source: str) -> dict[str, Any]:
    """Every layer is a mixture of experts with a gated shared expert; transformers' router
    always renormalizes the top k (its config has no norm_topk_prob, mlp_only_layers or
    decoder_sparse_step: a config.json that still carries them is read as transformers reads
    it, without them)."""
    return dict(num_moe_experts=_positive(hf, "num_experts", source),
                moe_router_topk=_positive(hf, "num_experts_per_tok", source),
                moe_ffn_hidden_size=_positive(hf, "moe_intermediate_size", source),
                moe_shared_expert_intermediate_size=_positive(
                    hf, "shared_expert_intermediate_size", source),
                moe_shared_expert_gate=True, moe_router_topk_normalize=True)


QWEN3_MOE = MoEFamily("Qwen3MoeForCausalLM", "qwen3_moe", "mlp.gate.weight",
                      "mlp.experts.{j}.", "gate_proj.weight", "up_proj.weight",
                      "down_proj.weight", qk_norm=True)
MIXTRAL = MoEFamily("MixtralForCausalLM", "mixtral", "block_sparse_moe.gate.weight",
                    "block_sparse_moe.experts.{j}.", "w1.weight", "w3.weight", "w2.weight",
                    qk_norm=False)
QWEN3_5_MOE = MoEFamily("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", "mlp.gate.weight",
                        "mlp.experts.{j}.", "gate_proj.weight", "up_proj.weight",
                        "down_proj.weight", qk_norm=False, shared_expert="mlp.shared_expert.",
                        shared_gate="mlp.shared_expert_gate.weight")
"""The MLP of a Qwen3.5-MoE layer (the attention part is Qwen3.5's, per layer kind)."""
_CONFIG_FIELDS = {QWEN3_MOE.hf_class: _qwen3_moe_fields, MIXTRAL.hf_class: _mixtral_fields,
                  QWEN3_5_MOE.hf_class: _qwen3_5_moe_fields}
MOE_FAMILIES = {f.hf_class: f for f in (QWEN3_MOE, MIXTRAL)}
"""The Llama-layout mixture-of-experts families (whole-model tables below)."""

__all__ = ["MoEFamily", "QWEN3_MOE", "MIXTRAL", "QWEN3_5_MOE", "MOE_FAMILIES"]


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
