"""Hugging Face <-> .nemo conversion, in one process on the CPU (or a GPU host).

``hf_to_nemo`` checks the whole source checkpoint (config fields, tensor names, shapes) before
building anything, builds one TP=1 megatron-core GPTModel (uninitialized, in the target dtype),
streams the safetensors shards into it and writes the .nemo atomically. ``nemo_to_hf`` loads the
.nemo into a TP=1 model (at the checkpoint's dtype) and streams safetensors shards out. Peak
memory is about one model copy plus one shard either way.

Round trips are exact: HF -> .nemo -> HF returns bitwise-equal tensors when ``dtype`` matches
the source dtype (the conversions only reshape, concatenate and split).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from typing import Optional

import torch

from nemo_aot.conversion import hf_io
from nemo_aot.conversion.engine import Mapping, check_source, expand, export, hf_nbytes, load_into
from nemo_aot.conversion.families import (
    REGISTRY,
    Family,
    family_for_model,
    hf_config_from_model,
    model_config_from_hf,
)
from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
from nemo_aot.models import nemo_format
from nemo_aot.models.config import GPTModelConfig, to_transformer_config

# megatron and models.gpt (which imports it) imported lazily: `nemo-aot --help` registers the
# convert command and must not load megatron.

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
HF_CONFIG_MEMBER = "hf_config/config.json"
HF_GENERATION_MEMBER = "hf_config/generation_config.json"
HF_SOURCE_MEMBER = "hf_config/source.json"  # where the weights came from (PEFT base_model)
MAX_SHARD_BYTES = 2 * 1024**3  # peak export memory: the model plus one shard
_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@contextmanager
def single_process_world():
    """A torch.distributed world of one for megatron; torn down afterwards if we made it."""
    dist = torch.distributed
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ValueError(f"conversion runs in a single process, but this is rank "
                             f"{dist.get_rank()} of {dist.get_world_size()}; run it with plain "
                             "python / nemo-aot, not torchrun")
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ValueError("conversion runs in a single process; unset WORLD_SIZE / run without "
                         "torchrun")
    saved = {k: os.environ.get(k) for k in _ENV}
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        yield
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build_single_model(model_cfg: GPTModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """One uninitialized TP=1, PP=1 GPTModel (every parameter is overwritten by a load)."""
    from nemo_aot.models.gpt import build_model_chunks

    parallel = ParallelConfig()
    initialize_model_parallel(parallel, model_cfg)
    config = to_transformer_config(model_cfg, parallel, _PRECISION[dtype],
                                   perform_initialization=False)
    (model,) = build_model_chunks(model_cfg, config)
    return model.eval()


def hf_to_nemo(hf_dir: str, out_path: str, dtype: str = "bf16",
               tokenizer_dir: Optional[str] = None) -> GPTModelConfig:
    """Convert a Hugging Face checkpoint directory into a .nemo file; returns its config."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not os.path.isdir(hf_dir):
        raise ValueError(f"Hugging Face checkpoint directory not found: {hf_dir}")
    config_path = os.path.join(hf_dir, hf_io.CONFIG)
    hf_cfg = hf_io.read_json(config_path, "Hugging Face config")
    arch, model_cfg = model_config_from_hf(hf_cfg, source=config_path)
    files, weight_map = hf_io.weight_files(hf_dir)
    headers = hf_io.tensor_headers(files, weight_map)
    arch = arch.for_checkpoint(headers)
    mappings = expand(arch.mappings(model_cfg), model_cfg.num_layers)
    check_source(mappings, {n: shape for n, (shape, _) in headers.items()},
                 arch.hf_shapes(model_cfg), hf_dir, arch.ignorable_suffixes,
                 arch.dropped_prefixes)
    tokenizer = hf_io.tokenizer_files(tokenizer_dir or hf_dir)
    if not tokenizer:
        raise ValueError(f"no tokenizer files ({', '.join(hf_io.TOKENIZER_FILES[:5])}, ...) in "
                         f"{tokenizer_dir or hf_dir}; copy them there or pass tokenizer_dir")
    extra = {HF_CONFIG_MEMBER: _read_bytes(config_path),
             HF_SOURCE_MEMBER: json.dumps(hf_source(hf_dir, hf_cfg)).encode()}
    generation = os.path.join(hf_dir, hf_io.GENERATION_CONFIG)
    if os.path.isfile(generation):
        extra[HF_GENERATION_MEMBER] = _read_bytes(generation)
    with single_process_world(), tempfile.TemporaryDirectory(prefix="nemo-aot-tok-") as tok:
        for path in tokenizer:
            shutil.copyfile(path, os.path.join(tok, os.path.basename(path)))
        model = build_single_model(model_cfg, DTYPES[dtype])
        target = dict(model.named_parameters())
        load_into(mappings, hf_io.iter_tensors(files), target, model_cfg, hf_dir)
        nemo_format.save_nemo(out_path, model_cfg, [model], tok, extra_files=extra)
    logger.info("wrote %s (%s, %s)", out_path, arch.hf_class, dtype)
    return model_cfg


def nemo_to_hf(nemo_path: str, out_dir: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Export a .nemo file as a Hugging Face directory (safetensors, configs, tokenizer)."""
    model_cfg, full_cfg = nemo_format.read_nemo_config(nemo_path)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with hf_io.staged_directory(out_dir) as staging, \
            tempfile.TemporaryDirectory(dir=parent, prefix=".nemo-extract-") as extracted:
        nemo_format.extract_nemo(nemo_path, extracted)
        stored = _stored_json(extracted, HF_CONFIG_MEMBER)
        arch = family_for_model(model_cfg, stored)
        if arch.export_as:  # a wrapper layout read for its text model: export that alone
            logger.warning("%s holds only the text model of a %s (its other towers were left "
                           "out at conversion); writing the text-only %s", nemo_path,
                           arch.hf_class, arch.export_as)
            arch, stored = REGISTRY[arch.export_as], None
        dtype = nemo_format.checkpoint_dtype(extracted)
        with single_process_world():
            model = build_single_model(model_cfg, dtype)
            nemo_format.load_nemo_weights([model], extracted)
            source = {k: v for k, v in model.state_dict().items()
                      if not k.endswith("_extra_state")}
            mappings = expand(arch.mappings(model_cfg), model_cfg.num_layers)
            shards = plan_shards(mappings, model_cfg, dtype, max_shard_bytes, arch)
            hf_io.write_shards(staging, [export(group, source, model_cfg) for group in shards])
            del model, source
        config = export_config(model_cfg, arch, stored, dtype)
        hf_io.write_json(os.path.join(staging, hf_io.CONFIG), config)
        generation = _stored_json(extracted, HF_GENERATION_MEMBER) or {
            "_from_model_config": True, **{k: config[k] for k in ("bos_token_id", "eos_token_id")
                                           if config.get(k) is not None}}
        hf_io.write_json(os.path.join(staging, hf_io.GENERATION_CONFIG), generation)
        _copy_tokenizer(extracted, full_cfg, staging)
    logger.info("wrote %s (%s, %s)", out_dir, arch.hf_class, dtype)


def plan_shards(mappings: list[Mapping], cfg: GPTModelConfig, dtype: torch.dtype,
                limit: int, family: Optional[Family] = None) -> list[list[Mapping]]:
    """Group mappings into shards of at most ``limit`` bytes (a mapping is never split)."""
    family = family or family_for_model(cfg)
    shapes, groups, current, size = family.hf_shapes(cfg), [], [], 0
    for mapping in (m for m in mappings if m.kind != "tied"):
        nbytes = hf_nbytes(mapping, shapes, dtype)
        if current and size + nbytes > limit:
            groups.append(current)
            current, size = [], 0
        current.append(mapping)
        size += nbytes
    return groups + ([current] if current else [])


def _same_architecture(a: GPTModelConfig, b: GPTModelConfig) -> bool:
    neutral = dict(encoder_seq_length=0, attention_backend="sdpa", make_vocab_size_divisible_by=1,
                   init_method_std=0.0)
    return dataclasses.replace(a, **neutral) == dataclasses.replace(b, **neutral)


def export_config(cfg: GPTModelConfig, arch: Family, stored: Optional[dict],
                  dtype: torch.dtype) -> dict:
    """The source config.json when it still describes the weights, else a generated one.

    A stored transformers-5 config (``rope_parameters``, ``dtype``) also gets the 4.x keys
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``): 5.x reads either, 4.x only those.
    """
    ids = {k: stored[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if stored and stored.get(k) is not None}
    generated = hf_config_from_model(cfg, arch, _HF_DTYPE[dtype], ids)
    if stored is None:
        return generated
    try:
        same = _same_architecture(model_config_from_hf(stored, "stored config.json")[1], cfg)
    except ValueError:
        same = False
    if not same:
        logger.warning("the stored Hugging Face config no longer matches model_config.yaml; "
                       "writing a generated config.json")
        return generated
    out = dict(stored)
    for key in arch.legacy_keys:
        out.setdefault(key, generated[key])
    out["torch_dtype"] = _HF_DTYPE[dtype]
    if "dtype" in out:
        out["dtype"] = _HF_DTYPE[dtype]
    return out


def _copy_tokenizer(extracted: str, full_cfg: dict, out_dir: str) -> None:
    section = full_cfg.get("tokenizer") or {}
    directory = nemo_format.nemo_artifact(extracted, section.get("type"))
    if directory and os.path.isdir(directory):
        for path in hf_io.tokenizer_files(directory):
            shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
        return
    model = nemo_format.nemo_artifact(extracted, section.get("model"))
    if model and os.path.isfile(model):
        shutil.copyfile(model, os.path.join(out_dir, "tokenizer.model"))
        logger.warning("the .nemo holds only a sentencepiece model; copied it as tokenizer.model, "
                       "add tokenizer_config.json before loading it with transformers")
        return
    logger.warning("the .nemo holds no tokenizer files; the export has none")


def hf_source(hf_dir: str, hf_cfg: dict) -> dict:
    """What a converted .nemo records of its Hugging Face origin: the folder, and the hub id
    its config.json names (``_name_or_path``), when it names one."""
    name = hf_cfg.get("_name_or_path")
    return {"folder": os.path.abspath(hf_dir),
            "hub_id": name if isinstance(name, str) and _looks_like_hub_id(name) else None}


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and \
        not os.path.isabs(name)


def hf_base_of(nemo_path: str) -> Optional[str]:
    """The Hugging Face model a .nemo was converted from, for ``base_model_name_or_path``: its
    folder while it still holds a config.json, else its hub id; None when unknown (a .nemo
    trained or converted before this was recorded, or a folder gone and no hub id)."""
    source = _nemo_member_json(nemo_path, HF_SOURCE_MEMBER) or {}
    folder = source.get("folder")
    if folder and os.path.isfile(os.path.join(folder, hf_io.CONFIG)):
        return folder
    if source.get("hub_id"):
        return source["hub_id"]
    name = (_nemo_member_json(nemo_path, HF_CONFIG_MEMBER) or {}).get("_name_or_path")
    return name if isinstance(name, str) and _looks_like_hub_id(name) else None


def _nemo_member_json(nemo_path: str, member: str) -> Optional[dict]:
    """One small JSON member of a .nemo file or extracted folder, read without unpacking it."""
    import tarfile

    try:
        if os.path.isdir(nemo_path):
            return _stored_json(nemo_path, member)
        with tarfile.open(nemo_path, "r:") as tar:
            for name in (member, f"./{member}"):
                try:
                    f = tar.extractfile(name)
                except KeyError:
                    continue
                return json.loads(f.read()) if f is not None else None
    except (OSError, tarfile.TarError, ValueError):
        return None
    return None


def _stored_json(extracted: str, member: str) -> Optional[dict]:
    path = os.path.join(extracted, *member.split("/"))
    return hf_io.read_json(path, member) if os.path.isfile(path) else None


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


__all__ = ["hf_to_nemo", "nemo_to_hf", "single_process_world", "build_single_model",
           "plan_shards", "export_config", "DTYPES"]
