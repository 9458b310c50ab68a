"""A Hugging Face hub cache built on local disk, as ``huggingface_hub`` lays it out
(``<HF_HOME>/hub/models--org--name/snapshots/<commit>/...`` and ``refs/<branch>``), so tests
resolve hub ids with ``HF_HUB_OFFLINE=1`` and no network."""

import json
import os
import shutil

# Llama-3.1-8B-Instruct's config.json as the hub serves it (architecture only: no weights).
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256,
}


def add_snapshot(hf_home, repo_id: str, files_from: str = None, files: dict = None,
                 commit: str = "0123456789abcdef0123456789abcdef01234567",
                 refs=("main",)) -> str:
    """Put a snapshot of ``repo_id`` at ``commit`` into ``hf_home``'s hub cache: the files of
    the folder ``files_from`` and/or ``files`` ({name: dict (JSON) or bytes}); ``refs`` point at
    it. Returns the snapshot folder."""
    repo = os.path.join(str(hf_home), "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    if files_from:
        for name in os.listdir(files_from):
            shutil.copy(os.path.join(files_from, name), os.path.join(snapshot, name))
    for name, content in (files or {}).items():
        data = json.dumps(content).encode() if isinstance(content, dict) else content
        with open(os.path.join(snapshot, name), "wb") as f:
            f.write(data)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


def tiny_llama_folder(root, vocab_size: int = 512, seed: int = 0) -> str:
    """A tiny random Llama saved with ``save_pretrained`` (fp32) and the bundled tokenizer:
    the same model ``tests/e2e/conftest.make_init_nemo`` converts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_aot.data.config import resolve_path

    folder = os.path.join(str(root), "hf")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = resolve_path("bundled:tokenizer")
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), os.path.join(folder, name))
    return folder


def offline_env(hf_home, cache) -> dict:
    """The environment of a node without network: the local hub cache, offline, and the
    converted cache in ``cache``."""
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", NEMO_AOT_CACHE=str(cache),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env
