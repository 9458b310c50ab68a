"""Reading and writing Hugging Face checkpoint directories (safetensors only).

Pickled ``pytorch_model*.bin`` weights are refused: loading them can run arbitrary code.
Reads look at safetensors headers first (names, shapes, dtypes: no tensor data), so a broken
checkpoint is refused before any memory is spent; tensors are then streamed one shard file at a
time. Writes go to a staging directory beside the output that is renamed into place at the end,
so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "chat_template.jinja", "chat_template.json")


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object")
    return value


def weight_files(hf_dir: str) -> tuple[list[str], dict[str, str]]:
    """Shard files to read, and the index's name -> file map ({} for a single file)."""
    if not os.path.isdir(hf_dir):
        raise ValueError(f"Hugging Face checkpoint directory not found: {hf_dir}")
    index_path = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index_path):
        weight_map = read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name:
                raise ValueError(f"{index_path} names shard {name!r} outside the directory")
            if not os.path.isfile(os.path.join(hf_dir, name)):
                listed = sorted(k for k, v in weight_map.items() if v == name)
                raise ValueError(f"missing shard {name} in {hf_dir}: {INDEX} lists it for "
                                 f"{len(listed)} tensors (e.g. {listed[0]}); re-download it")
        return [os.path.join(hf_dir, n) for n in files], weight_map
    if os.path.isfile(os.path.join(hf_dir, SINGLE)):
        return [os.path.join(hf_dir, SINGLE)], {}
    if any(n.endswith(".bin") for n in os.listdir(hf_dir)):
        raise ValueError(f"{hf_dir} holds pickled .bin weights, which are not loaded (unpickling "
                         "can run code); re-save with save_pretrained(safe_serialization=True)")
    raise ValueError(f"no {SINGLE} or {INDEX} in {hf_dir}")


def tensor_headers(files: list[str], weight_map: dict[str, str]
                   ) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) from the file headers, with consistency checks."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    where: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in found:
                        raise ValueError(f"tensor {name} appears in both {where[name]} and "
                                         f"{os.path.basename(path)}")
                    piece = f.get_slice(name)
                    found[name] = (tuple(piece.get_shape()), piece.get_dtype())
                    where[name] = os.path.basename(path)
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"cannot read safetensors file {path}: {err}") from err
    if weight_map:
        wrong = sorted(n for n, f in weight_map.items() if where.get(n) != f)
        if wrong:
            raise ValueError(f"{INDEX} disagrees with the shard files for {len(wrong)} tensors "
                             f"(e.g. {wrong[0]} is listed in {weight_map[wrong[0]]})")
    bad = sorted(n for n, (_, dt) in found.items() if dt not in ("F32", "BF16", "F16"))
    if bad:
        raise ValueError(f"non-float tensors (quantized checkpoint?) are not supported: {bad[:4]}")
    return found


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor, one shard file at a time (only that file's tensors are materialized)."""
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def tokenizer_files(directory: str) -> list[str]:
    return [os.path.join(directory, n) for n in TOKENIZER_FILES
            if os.path.isfile(os.path.join(directory, n))]


@contextmanager
def staged_directory(out_dir: str):
    """Yield a staging dir beside ``out_dir``; rename it into place only if the body succeeds."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"output directory {out_dir} exists and is not empty; choose a new one")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.partial-")
    try:
        yield staging
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(staging, out_dir)
        os.chmod(out_dir, 0o755)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_shards(out_dir: str, shards: list[Iterator[tuple[str, torch.Tensor]]]) -> None:
    """Write one safetensors file per planned shard (plus the index when there are several)."""
    count = len(shards)
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, start=1):
        name = SINGLE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
        block = dict(tensors)
        total += sum(t.numel() * t.element_size() for t in block.values())
        save_file(block, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in block})
        del block
    if count > 1:
        with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


__all__ = ["read_json", "weight_files", "tensor_headers", "iter_tensors", "tokenizer_files",
           "staged_directory", "write_shards", "write_json", "TOKENIZER_FILES"]
