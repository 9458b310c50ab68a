"""Export a ``.nemo`` policy from any complete training checkpoint (``nemo-aot export``).

A run exports its policy once, at the end. To take the policy of an earlier step, or of a run
that was stopped before its end::

    nemo-aot export --checkpoint RUN_DIR/checkpoints --out policy.nemo   # newest complete
    nemo-aot export --checkpoint RUN_DIR/checkpoints --step 400 --out policy_400.nemo
    nemo-aot export --checkpoint RUN_DIR/checkpoints/step_00000400 --out policy_400.nemo

Every checkpoint folder carries the run's resolved config (``config.yaml``), from which the
architecture comes, and the tokenizer the run trained with (``tokenizer/``). Only the model
weights are read (no optimizer state), into megatron-core's local layer spec, whose sharded
keys match the TransformerEngine spec's, so a checkpoint trained with TE/FP8 exports on a CPU
host too.

Layout: in one process the weights are read at TP=PP=1, whatever layout trained them (the
dist checkpoint reshards on load); that needs the whole model in host memory once. For a model
that does not fit one process, run the export under ``torchrun``/``srun`` with the layout as
overrides (e.g. ``parallel.tensor_model_parallel_size=8``); every rank then reads its shard.
The export never changes the checkpoint folder.

LoRA runs (``peft.scheme=lora``) checkpoint their adapters only: the export reads the base
weights from the run's ``init_from``, adds ``(alpha / r) B A`` and writes a plain .nemo (the
merged policy); ``--adapter-out DIR`` also writes the adapters in the Hugging Face PEFT layout.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from nemo_aot.algorithms.adapters import export_adapter
from nemo_aot.algorithms.checkpointing import CONFIG_FILE, TOKENIZER_COPY, find_checkpoint
from nemo_aot.algorithms.resolve import World, resolve_stored
from nemo_aot.data.config import resolve_path
from nemo_aot.distributed.parallel import (
    ParallelConfig,
    init_distributed,
    initialize_model_parallel,
)
from nemo_aot.models.config import to_transformer_config
from nemo_aot.models.dist_weights import check_dist_checkpoint, load_dist_weights
from nemo_aot.models.nemo_format import nemo_sharded_state_dict, save_nemo

# omegaconf and models.gpt (megatron) imported lazily: `nemo-aot --help` registers this
# command and must not load them.


def checkpoint_config(folder: str, config_path: Optional[str] = None,
                      overrides: Sequence[str] = ()):
    """The run stored with a checkpoint (its config, or ``config_path``), with KEY=VALUE
    overrides, resolved (``resolve.resolve_stored``: the architecture is the stored one)."""
    path = config_path or os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no {CONFIG_FILE} (checkpoints written before it was "
                         "stored have none); pass --config with the run's resolved config "
                         "(`nemo-aot train --print-config <the run's overrides>` prints it)")
    return resolve_stored(path, overrides, world=World.planned())


def export_checkpoint(path: str, out: str, *, step: Optional[int] = None,
                      config_path: Optional[str] = None, overrides: Sequence[str] = (),
                      adapter_out: Optional[str] = None) -> str:
    """Write the policy weights of a training checkpoint as ``out`` (.nemo), and for a LoRA
    run its adapters as a PEFT folder ``adapter_out``; collective under torch.distributed
    (every rank calls it). Returns the checkpoint folder it read."""
    from nemo_aot.models.aot_model import load_nemo_into
    from nemo_aot.models.gpt import build_model_chunks
    from nemo_aot.models.lora import MERGED, is_adapter_name

    folder = find_checkpoint(path, step)
    run = checkpoint_config(folder, config_path, overrides)
    cfg = run.config
    if os.path.abspath(out).startswith(os.path.abspath(folder) + os.sep):
        raise ValueError(f"--out {out} is inside the checkpoint {folder}; write it elsewhere")
    lora = cfg.peft.enabled
    if adapter_out is not None and not lora:
        raise ValueError(f"--adapter-out: {folder} is a full fine-tuning checkpoint (the run "
                         "had peft.scheme=none); it has no adapters")
    if lora and not cfg.init_from:
        raise ValueError(f"{folder} holds LoRA adapters only and its run had no init_from: "
                         "the base weights are not stored anywhere to merge them into")
    init_distributed()
    world = torch.distributed.get_world_size()
    parallel = cfg.parallel
    if world == 1 and not any(o.startswith("parallel.") for o in overrides):
        parallel = ParallelConfig()  # one process reads every shard: TP=PP=1
    initialize_model_parallel(parallel, cfg.model, seed=cfg.trainer.seed)
    config = to_transformer_config(cfg.model, parallel, cfg.precision.precision,
                                   perform_initialization=False)  # every weight is loaded
    chunks = build_model_chunks(cfg.model, config, "local", peft=cfg.peft if lora else None)
    if lora:  # the frozen base from init_from, the adapters from the checkpoint
        load_nemo_into(run.init_from, chunks)
    # Training checkpoints store the model's sharded keys unprefixed. The reader the .nemo
    # loader uses screens the files (no unpickling of code) and re-pads the vocabulary tables
    # when this layout pads them differently from the training layout (e.g. TP8 -> TP1).
    load_dist_weights(chunks, check_dist_checkpoint(folder), prefix="",
                      select=is_adapter_name if lora else None)
    tokenizer = os.path.join(folder, TOKENIZER_COPY)  # the run's tokenizer, saved with the state
    if not os.path.isdir(tokenizer):  # checkpoints written before it was stored
        tokenizer = resolve_path(cfg.data.tokenizer_path) if cfg.data.tokenizer_path else None
    save_nemo(out, cfg.model, nemo_sharded_state_dict(chunks, {MERGED: True} if lora else None),
              tokenizer)
    if adapter_out is not None:
        export_adapter(chunks, cfg, adapter_out, base_model=cfg.init_from)
    return folder


def register(subparsers):
    """Add ``export`` to the main CLI's subparsers."""
    parser = subparsers.add_parser(
        "export", help="write a .nemo policy from a training checkpoint (any complete step)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a run's folder or its checkpoints/ folder (the newest complete "
                             "step, or --step), or one step folder")
    parser.add_argument("--out", required=True, metavar="FILE.nemo", help="the .nemo to write")
    parser.add_argument("--step", type=int, default=None,
                        help="which complete step to export (default: the newest)")
    parser.add_argument("--adapter-out", default=None, metavar="DIR",
                        help="LoRA runs: also write the adapters as a Hugging Face PEFT folder "
                             "(adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="the run's resolved config, for checkpoints that carry none")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. the layout for a multi-process export: "
                             "parallel.tensor_model_parallel_size=8")
    parser.set_defaults(func=_run)
    return parser


def _run(args) -> int:
    folder = export_checkpoint(args.checkpoint, args.out, step=args.step,
                               config_path=args.config, overrides=args.overrides,
                               adapter_out=args.adapter_out)
    if torch.distributed.get_rank() == 0:
        print(f"nemo-aot export: {folder} -> {args.out}")
    return 0


__all__ = ["checkpoint_config", "export_checkpoint", "register",
           "CONFIG_FILE"]
