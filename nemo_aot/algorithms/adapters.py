"""LoRA adapters in and out of a run: ``peft.adapter_from`` and the Hugging Face PEFT export.

``peft.adapter_from`` names either a Hugging Face PEFT folder (``adapter_config.json``, e.g.
one a run exported, or its hub id ``org/name[@revision]``) or a LoRA training checkpoint (a
``step_N`` folder, or a run's folder / ``checkpoints/`` for its newest complete step); the base
weights come from ``init_from``.
Both load at any TP/PP layout: a PEFT folder holds whole tensors, sliced here to this rank's
shards; a checkpoint is a megatron dist checkpoint of the adapters, resharded on load.

The PEFT export gathers the adapters whole on global rank 0 (TP all-gather, then the pipeline
stages' layers), which writes ``adapter_config.json`` + ``adapter_model.safetensors``; adapters
are small (rank x (in + out) per adapted weight), so this fits any run.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Optional

from nemo_aot.algorithms.checkpointing import find_checkpoint
from nemo_aot.conversion.convert import hf_base_of
from nemo_aot.conversion.peft_adapter import (
    adapter_config,
    is_peft_folder,
    read_peft_adapter,
    write_peft_adapter,
)
from nemo_aot.conversion.sources import local_or_hub_folder
from nemo_aot.data.config import resolve_path
from nemo_aot.distributed import ranks

# megatron and the model modules that import it are imported where used (see run.py).

logger = logging.getLogger(__name__)

ADAPTER_DIR = "aot_adapter"  # in the run folder: the PEFT export of a finished LoRA run


def load_adapter_from(chunks, cfg) -> str:
    """Fill the chunks' adapters from ``cfg.peft.adapter_from`` (collective); returns the
    folder read."""
    from nemo_aot.models.dist_weights import check_dist_checkpoint, load_dist_weights
    from nemo_aot.models.lora import is_adapter_name, load_full_adapters

    source = local_or_hub_folder(resolve_path(cfg.peft.adapter_from), "peft.adapter_from",
                                 "adapter")
    if not os.path.isdir(source):
        raise ValueError(f"peft.adapter_from={cfg.peft.adapter_from} is not a folder: give a "
                         "Hugging Face PEFT adapter folder or a LoRA training checkpoint")
    if is_peft_folder(source):
        p = cfg.peft
        adapters = read_peft_adapter(source, cfg.model, p.rank, p.alpha, list(p.target_modules))
        load_full_adapters(chunks, adapters, f"peft.adapter_from={source}")
        return source
    folder = find_checkpoint(source)
    _check_lora_checkpoint(folder)
    # Training checkpoints store the model's sharded keys unprefixed; read the adapters only.
    load_dist_weights(chunks, check_dist_checkpoint(folder), prefix="", select=is_adapter_name)
    return folder


def _check_lora_checkpoint(folder: str) -> None:
    from nemo_aot.models.dist_weights import read_checkpoint_metadata

    stored = read_checkpoint_metadata(folder).state_dict_metadata
    if not any(".adapter." in key for key in stored):
        raise ValueError(f"peft.adapter_from: {folder} is a checkpoint without LoRA adapters "
                         "(a full fine-tuning run?); use it as init_from after `nemo-aot "
                         "export`, or give a LoRA run's checkpoint")


def export_adapter(chunks, cfg, out_dir: str, base_model: Optional[str] = None) -> str:
    """Write the chunks' adapters as a Hugging Face PEFT folder ``out_dir`` (collective:
    every rank gathers, rank 0 writes; a failure there raises on every rank). ``base_model``
    is the run's init_from (.nemo): ``base_model_name_or_path`` is the Hugging Face folder or
    hub id it was converted from when known (what ``AutoPeftModelForCausalLM`` loads), else
    unset, and a warning says what to pass as the base."""
    from nemo_aot.models.lora import full_adapters

    adapters = full_adapters(chunks)
    error = None
    if ranks.is_rank_zero():
        p = cfg.peft
        hf_base = hf_base_of(resolve_path(base_model)) if base_model else None
        if hf_base is None:
            logger.warning(
                "%s: adapter_config.json names no base model (%s); load it with "
                "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), %r), "
                "BASE being the Hugging Face folder the base was converted from, or one made "
                "by `nemo-aot convert nemo-to-hf --nemo %s --out BASE`", out_dir,
                f"the base .nemo {base_model} records no Hugging Face origin" if base_model
                else "the run had no init_from", out_dir, base_model or "<base .nemo>")
        config = adapter_config(p.rank, float(p.alpha), float(p.dropout),
                                list(p.target_modules), hf_base)
        try:
            if is_peft_folder(out_dir):  # a finished run exporting again (requeued)
                shutil.rmtree(out_dir)
            write_peft_adapter(out_dir, adapters, cfg.model, config)
        except (OSError, ValueError) as err:
            error = f"writing the LoRA adapter to {out_dir} failed: {err}"
    error = ranks.from_rank0(error)
    if error:
        raise ValueError(error)
    return out_dir


__all__ = ["load_adapter_from", "export_adapter", "ADAPTER_DIR"]
