"""Reading model weights from megatron-core torch_dist checkpoints without trusting the files.

Used for ``.nemo`` weights (keys under ``model.``) and for training checkpoints (``nemo-aot
export``; keys unprefixed). Any TP/PP layout reads any stored layout (dist checkpoints reshard
on load); the vocabulary tables (embedding, output layer) are read whole and re-padded when the
loading layout pads them to a different row count.

Safety: nothing here unpickles code. ``.metadata`` goes through an allow-listed unpickler,
``common.pt`` through torch's weights-only loader, every requested key must be stored as a
tensor (pickled byte entries such as ``_extra_state`` are never read), and tensors load
weights-only (torch DCP). megatron's own ``dist_checkpointing.load`` then reads files that
passed these checks.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from typing import Callable, Optional, Sequence

import torch

# Tables with one row per (padded) vocabulary entry, relative to the key prefix.
VOCAB_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(module, "module", None), torch.nn.Module):  # DDP, Float16Module
        module = module.module
    return module


def chunks_sharded_state_dict(chunks: Sequence[torch.nn.Module], prefix: str,
                              metadata: Optional[dict] = None) -> dict:
    """The chunks' sharded state dict, keys under ``prefix``; ``model_{i}`` per virtual
    pipeline chunk (NeMo's nesting; only the keys of the sharded tensors are stored).
    ``metadata`` goes to megatron's ``sharded_state_dict`` (e.g. LoRA's merged view)."""
    modules = [_unwrap(c) for c in chunks]
    if len(modules) == 1:
        return modules[0].sharded_state_dict(prefix=prefix, metadata=metadata)
    return {f"model_{i}": m.sharded_state_dict(prefix=prefix, metadata=metadata)
            for i, m in enumerate(modules)}


def check_dist_checkpoint(wdir: str) -> str:
    """``wdir``, checked to be a megatron torch_dist dist checkpoint."""
    try:
        with open(os.path.join(wdir, "metadata.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{wdir}/metadata.json is missing or invalid: {err}") from err
    backends = (meta.get("sharded_backend"), meta.get("common_backend", "torch"))
    if backends != ("torch_dist", "torch"):
        raise ValueError(f"{wdir}: backend {meta.get('sharded_backend')!r} is not supported "
                         "(only torch_dist); convert zarr checkpoints with NeMo first")
    return wdir


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch DCP ``.metadata``: plain DCP dataclasses and torch dtypes, nothing else."""

    _ALLOWED = {
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
        *(("torch.distributed.checkpoint.metadata", n) for n in (
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
        *(("torch.distributed.checkpoint.planner", n) for n in (
            "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    }

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def unpickle_metadata(data: bytes, where: str):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # UnpicklingError and anything a crafted stream raises
        raise ValueError(f"{where}: .metadata is not a plain torch_dist metadata file ({err}); "
                         "refusing to unpickle it (tampered or foreign checkpoint)") from err
    if not isinstance(meta, Metadata):
        raise ValueError(f"{where}: .metadata holds a {type(meta).__name__}, not metadata")
    return meta


def read_checkpoint_metadata(wdir: str):
    """The DCP Metadata of ``wdir/.metadata``, unpickled through an allow-list."""
    path = os.path.join(wdir, ".metadata")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"{wdir}: cannot read .metadata: {err}") from err
    return unpickle_metadata(data, wdir)


def check_common(wdir: str) -> None:
    path = os.path.join(wdir, "common.pt")
    if not os.path.exists(path):
        return  # megatron reports a missing common file itself
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} holds more than tensors and plain containers ({err}); refusing "
                         "to unpickle it (tampered or foreign checkpoint)") from err


def load_dist_weights(chunks: Sequence[torch.nn.Module], wdir: str, prefix: str,
                      select: Optional[Callable[[str], bool]] = None) -> None:
    """Load the model tensors of a torch_dist checkpoint ``wdir`` whose keys are the model's
    sharded keys under ``prefix`` (``model.`` in a .nemo, none in a training checkpoint) into
    this rank's chunks, at any TP/PP layout, with the checks of this module (collective).
    ``select``: which of the model's state-dict names to read (default: all of them; e.g. a
    base .nemo into a model with LoRA adapters: all but the adapters)."""
    from megatron.core import dist_checkpointing

    stored = read_checkpoint_metadata(wdir).state_dict_metadata
    check_common(wdir)
    modules = [_unwrap(c) for c in chunks]
    request = chunks_sharded_state_dict(modules, prefix)
    subs = [request] if len(modules) == 1 else [request[f"model_{i}"] for i in range(len(modules))]
    if select is not None:
        for sub in subs:
            for name in [n for n in sub if not select(n[len(prefix):])]:
                del sub[name]
    vocab_keys = tuple(prefix + n for n in VOCAB_NAMES)
    repad = [_prepare_request(sub, stored, wdir, vocab_keys) for sub in subs]
    wanted = [set(sub) for sub in subs]
    state = dist_checkpointing.load(request, wdir)
    loaded = [state] if len(modules) == 1 else [state[f"model_{i}"] for i in range(len(modules))]
    del request, subs, state
    for module, part, keys, originals in zip(modules, loaded, wanted, repad):
        targets = module.state_dict(keep_vars=True)
        for name in keys:
            # Copy and release one tensor at a time: peak memory stays near one model copy.
            value, original = part.pop(name), originals.get(name)
            key = name[len(prefix):]
            if key not in targets:
                raise ValueError(f"{wdir}: {name} has no parameter in the model")
            target = targets.pop(key)
            with torch.no_grad():
                if original is None:
                    target.copy_(value)
                else:  # this rank's rows of a vocabulary table read whole
                    start, rows = original.global_offset[0], original.local_shape[0]
                    take = max(0, min(rows, value.shape[0] - start))
                    target.zero_()
                    target[:take].copy_(value[start:start + take])
            del value
        missing = sorted(k for k in targets if not k.endswith("_extra_state")
                         and (select is None or select(k)))
        if missing:
            raise ValueError(f"{wdir}: model parameters not in the request: {missing}")


def _prepare_request(sub: dict, stored: dict, wdir: str, vocab_keys: tuple) -> dict:
    """Check one chunk's request against the metadata, in place: drop ``_extra_state`` objects
    (pickled bytes), refuse missing, non-tensor or misshapen entries, and turn a vocabulary
    table padded differently into a whole-table read. Returns {name: original} of those."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, is_main_replica

    repad, problems = {}, []
    for name, item in list(sub.items()):
        if isinstance(item, ShardedObject):  # _extra_state: never read
            del sub[name]
            continue
        if not hasattr(item, "key"):  # plain (common) state
            continue
        if isinstance(item, ShardedTensorFactory):  # stored as its parts (GatedDeltaNet in_proj)
            problems += _factory_problems(item, stored)
            continue
        entry = stored.get(item.key)
        size = tuple(getattr(entry, "size", ()))
        if entry is None:
            problems.append(f"missing {item.key}")
        elif not hasattr(entry, "size"):
            problems.append(f"{item.key} is stored as pickled bytes, not a tensor")
        elif isinstance(item, ShardedTensor) and size != item.global_shape:
            if item.key not in vocab_keys or size[1:] != item.global_shape[1:]:
                problems.append(f"{item.key} stored {size}, model needs {item.global_shape}")
                continue
            # Every rank reads the table whole; exactly one (the main replica of the first
            # row block) owns it in megatron's access check.
            owner = is_main_replica(item.replica_id) and item.global_offset[0] == 0
            repad[name] = item
            sub[name] = ShardedTensor.from_rank_offsets(
                item.key, torch.empty(size, dtype=item.data.dtype), replica_id=0 if owner else 1)
    if problems:
        raise ValueError(f"{wdir} does not fit the model built from its config: "
                         + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return repad


def _factory_problems(factory, stored: dict) -> list[str]:
    """Missing or misshapen stored parts of a tensor megatron saves split into pieces."""
    problems = []
    for part in factory.build():
        entry = stored.get(part.key)
        if entry is None or not hasattr(entry, "size"):
            problems.append(f"missing {part.key}")
        elif tuple(entry.size) != part.global_shape:
            problems.append(f"{part.key} stored {tuple(entry.size)}, model needs "
                            f"{part.global_shape}")
    return problems


__all__ = ["load_dist_weights", "check_dist_checkpoint", "read_checkpoint_metadata",
           "unpickle_metadata", "check_common", "chunks_sharded_state_dict", "VOCAB_NAMES"]
