"""LoRA adapters <-> the Hugging Face PEFT folder layout (``adapter_config.json`` +
``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained`` loads onto the Hugging
Face base model.

Adapters are given whole (TP=1 layout) as ``{(layer index, target): (A, B)}`` with megatron's
fused layers: one ``A`` [r, h] and ``B`` [(H + 2G) d, r] for ``linear_qkv``, one ``A`` and
``B`` = [gate; up] for ``linear_fc1``. Hugging Face adapts q/k/v_proj and gate/up_proj
separately: each gets the shared ``A`` and its rows of ``B`` (split as the weights are, with
``tensor_ops``), so ``B_q A`` is exactly the q rows of ``B A``. Reading back needs the shared
``A`` (an adapter trained with separate q/k/v ``A`` matrices has no fused equivalent of the
same rank, and is refused).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from nemo_aot.conversion import hf_io
from nemo_aot.conversion import tensor_ops as ops
from nemo_aot.models.config import GPTModelConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers.{i}."
# megatron target -> (Hugging Face modules, how B splits)
HF_MODULES = {
    "linear_qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
    "linear_proj": (("self_attn.o_proj",), "direct"),
    "linear_fc1": (("mlp.gate_proj", "mlp.up_proj"), "gate_up"),
    "linear_fc2": (("mlp.down_proj",), "direct"),
    "in_proj": (("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                 "linear_attn.in_proj_a"), "gdn_in_proj"),
    "out_proj": (("linear_attn.out_proj",), "direct"),
}


def _split_b(b: torch.Tensor, kind: str, cfg: GPTModelConfig) -> tuple[torch.Tensor, ...]:
    if kind == "qkv" and cfg.attention_output_gate:
        return ops.split_gated_qkv(b, cfg.num_attention_heads, cfg.query_groups, cfg.head_dim)
    if kind == "qkv":
        return ops.split_qkv(b, cfg.num_attention_heads, cfg.query_groups, cfg.head_dim)
    if kind == "gate_up":
        return ops.split_gate_up(b)
    if kind == "gdn_in_proj":
        return ops.split_gdn_in_proj(b, cfg)
    return (b,)


def _merge_b(parts: list[torch.Tensor], kind: str, cfg: GPTModelConfig) -> torch.Tensor:
    if kind == "qkv" and cfg.attention_output_gate:
        return ops.merge_gated_qkv(*parts, cfg.num_attention_heads, cfg.query_groups)
    if kind == "qkv":
        return ops.merge_qkv(*parts, cfg.query_groups)
    if kind == "gate_up":
        return ops.merge_gate_up(*parts)
    if kind == "gdn_in_proj":
        return torch.cat(parts, dim=0)
    return parts[0]


def layer_targets(cfg: GPTModelConfig, layer: int, targets: list[str]) -> list[str]:
    """The targets a layer has: Gated DeltaNet layers have in_proj/out_proj, attention layers
    linear_qkv/linear_proj (both have the MLP's)."""
    if cfg.linear_attention is None:
        absent = ("in_proj", "out_proj")
    elif cfg.linear_attention.pattern(cfg.num_layers)[layer]:
        absent = ("linear_qkv", "linear_proj")
    else:
        absent = ("in_proj", "out_proj")
    return [t for t in targets if t not in absent]


def adapter_config(rank: int, alpha: float, dropout: float, targets: list[str],
                   base_model: Optional[str] = None) -> dict:
    """The PEFT ``LoraConfig`` fields of these adapters (plain LoRA: scale alpha / r)."""
    modules = sorted(name.split(".")[-1] for t in targets for name in HF_MODULES[t][0])
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": modules, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
            "base_model_name_or_path": base_model}


def to_peft_tensors(adapters: dict, cfg: GPTModelConfig) -> dict[str, torch.Tensor]:
    """PEFT's tensor names and values for whole megatron adapters (each owns its storage)."""
    out = {}
    for (layer, target), (a, b) in sorted(adapters.items()):
        names, kind = HF_MODULES[target]
        for name, part in zip(names, _split_b(b, kind, cfg), strict=True):
            key = _PREFIX.format(i=layer) + name
            out[f"{key}.lora_A.weight"] = a.clone(memory_format=torch.contiguous_format)
            out[f"{key}.lora_B.weight"] = part.clone(memory_format=torch.contiguous_format)
    return out


def write_peft_adapter(out_dir: str, adapters: dict, cfg: GPTModelConfig, config: dict) -> None:
    """Write the folder atomically (``out_dir`` must not exist or be empty)."""
    from safetensors.torch import save_file

    with hf_io.staged_directory(out_dir) as staging:
        save_file(to_peft_tensors(adapters, cfg), os.path.join(staging, WEIGHTS),
                  metadata={"format": "pt"})
        hf_io.write_json(os.path.join(staging, CONFIG), config)


def is_peft_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG))


def read_peft_adapter(folder: str, cfg: GPTModelConfig, rank: int, alpha: float,
                      targets: list[str]) -> dict:
    """Whole megatron adapters from a PEFT folder whose rank, alpha and target modules are the
    run's (``peft.rank``, ``peft.alpha``, ``peft.target_modules``)."""
    from safetensors.torch import load_file

    config = hf_io.read_json(os.path.join(folder, CONFIG), "PEFT adapter config")
    _check_config(config, folder, rank, alpha, targets)
    path = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no {WEIGHTS} (pickled adapter_model.bin is not loaded)")
    tensors = {k.replace(".default.", "."): v for k, v in load_file(path).items()}
    adapters, used = {}, set()
    for layer in range(cfg.num_layers):
        for target in layer_targets(cfg, layer, targets):
            names, kind = HF_MODULES[target]
            keys = [_PREFIX.format(i=layer) + n for n in names]
            wanted = [f"{k}.lora_{s}.weight" for k in keys for s in "AB"]
            missing = [w for w in wanted if w not in tensors]
            if missing:
                raise ValueError(f"{folder}: {WEIGHTS} lacks {missing[:3]} (trained for another "
                                 "model or other target modules?)")
            used.update(wanted)
            a_parts = [tensors[f"{k}.lora_A.weight"] for k in keys]
            if any(not torch.equal(a_parts[0], p) for p in a_parts[1:]):
                raise ValueError(f"{folder}: layer {layer} has different lora_A for "
                                 f"{', '.join(names)}; megatron's fused {target} needs one "
                                 "shared A (adapters trained here or by NeMo have it)")
            adapters[(layer, target)] = (a_parts[0], _merge_b(
                [tensors[f"{k}.lora_B.weight"] for k in keys], kind, cfg))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{folder}: tensors beyond the model's layers/targets: {extra[:3]}")
    return adapters


def _check_config(config: dict, folder: str, rank: int, alpha: float,
                  targets: list[str]) -> None:
    def refuse(what: str) -> None:
        raise ValueError(f"peft.adapter_from={folder}: {what}")

    if config.get("peft_type") != "LORA":
        refuse(f"peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_rslora", "use_dora", "modules_to_save", "layers_to_transform"):
        if config.get(key):
            refuse(f"{key}={config[key]!r} is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none" or config.get("rank_pattern") or \
            config.get("alpha_pattern"):
        refuse("bias adapters and per-module rank/alpha patterns are not supported")
    if config.get("r") != rank:
        refuse(f"r={config.get('r')} but peft.rank={rank}; set peft.rank={config.get('r')}")
    if float(config.get("lora_alpha", 0)) != float(alpha):
        refuse(f"lora_alpha={config.get('lora_alpha')} but peft.alpha={alpha}; set "
               f"peft.alpha={config.get('lora_alpha')}")
    modules = config.get("target_modules")
    modules = sorted([modules] if isinstance(modules, str) else modules or [])
    expected = adapter_config(rank, alpha, 0.0, targets)["target_modules"]
    if modules != expected:
        refuse(f"target_modules {modules} are not those of peft.target_modules={targets} "
               f"({expected})")


__all__ = ["layer_targets", "adapter_config", "to_peft_tensors", "write_peft_adapter",
           "read_peft_adapter", "is_peft_folder", "HF_MODULES", "CONFIG", "WEIGHTS"]
