"""The ``.nemo`` file: an uncompressed tar that NeMo's MegatronGPTModel (mcore) layout also uses.

Layout (member names relative to the tar root)::

    model_config.yaml      NeMo MegatronGPTModel keys + a few of ours (see below)
    model_weights/         megatron-core dist checkpoint (torch_dist): metadata.json, .metadata,
                           common.pt, __*_*.distcp; sharded keys carry NeMo's ``model.`` prefix
                           (``model.decoder.layers.self_attention.linear_qkv.weight`` ...), one
                           ``model_{i}`` nesting level per virtual pipeline chunk as NeMo does
    tokenizer/             Hugging Face tokenizer files (config: ``tokenizer.type: nemo:tokenizer``)
    hf_config/             optional: the source config.json / generation_config.json

Weights are a dist checkpoint, so they load at any TP/PP layout. The embedding and output layer
are padded to ``make_vocab_size_divisible_by * TP`` rows; when the loading layout pads to a
different size the table is read whole and re-padded (rows past the vocabulary are padding).

Compatibility with NeMo 1.x/2.x MegatronGPTModel ``.nemo`` files (mcore, torch_dist):
read: config keys (``rmsnorm``/``fast-swiglu``/``rotary_percentage``/``override_vocab_size``/
``scale_positional_embedding``), ``model.`` keys, TE or local layer spec (megatron's local spec
stores its norms under the TE names), ``./``-prefixed members, gzip tars. Not read: zarr or
pre-dist (``model_weights.ckpt``) checkpoints, linear RoPE (``seq_len_interpolation_factor``),
sentencepiece-only tokenizers (the weights load; the tokenizer must be supplied). NeMo loading
ours: keys and shapes match its local spec (``transformer_engine: false``); its TE spec also
expects TE attention ``_extra_state`` entries the local spec does not write; the HF tokenizer is
an artifact directory, so NeMo needs ``tokenizer.type`` pointed at it (or at a hub id).

Reading: ``open_nemo(path)`` yields a folder holding the extracted .nemo: ``path`` itself when it
is already an extracted folder (nothing copied), else one copy per node, made by the node's local
rank 0 and removed after use. Environment variable:

    NEMO_AOT_EXTRACT_DIR   where .nemo files are extracted (default: the system temp folder,
                           ``$TMPDIR`` or /tmp); needs about the .nemo's size free on each node

``extract_tokenizer(path, dest)`` extracts only the tokenizer artifact (no weights).

Safety: extraction refuses absolute paths, ``..``, links and special files; loading never
unpickles code: ``.metadata`` goes through an allow-listed unpickler, ``common.pt`` through
torch's weights-only loader, requested keys must be tensors (pickled byte entries such as
``_extra_state`` are never read), and tensors themselves load weights-only (torch DCP); see
``nemo_aot.models.dist_weights``, which also reads training checkpoints for ``nemo-aot export``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import uuid
import zlib
from typing import Any, Iterator, Optional, Sequence

import torch
import yaml

from nemo_aot.distributed import ranks
from nemo_aot.models.config import GPTModelConfig, RopeScaling
from nemo_aot.models.dist_weights import (
    VOCAB_NAMES,
    check_dist_checkpoint,
    chunks_sharded_state_dict,
    load_dist_weights,
    read_checkpoint_metadata,
    unpickle_metadata,
)

CONFIG_NAME = "model_config.yaml"
EXTRACT_DIR_ENV = "NEMO_AOT_EXTRACT_DIR"
WEIGHTS_DIR = "model_weights"
TOKENIZER_DIR = "tokenizer"
KEY_PREFIX = "model."
_VOCAB_KEYS = tuple(KEY_PREFIX + n for n in VOCAB_NAMES)
_SAME_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "encoder_seq_length", "max_position_embeddings",
              "position_embedding_type", "rotary_base", "layernorm_epsilon", "bias", "qkv_bias",
              "share_embeddings_and_output_weights", "make_vocab_size_divisible_by",
              "init_method_std", "vocab_size", "attention_backend",
              # options of newer families (megatron-core / NeMo names where they exist)
              "qk_layernorm", "layernorm_zero_centered_gamma", "post_sublayer_norms",
              "scale_embeddings", "softmax_scale", "sliding_window", "window_attn_skip_freq",
              "rotary_base_local",
              # hybrid linear-attention models (Qwen3.5)
              "attention_output_gate", "linear_attention")
# Mixture of experts (megatron-core's / NeMo's names): written when set,
# read when present (a dense model's model_config.yaml carries none of them).
_MOE_KEYS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
             "moe_router_score_function", "moe_router_topk_normalize",
             "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size",
             "moe_shared_expert_gate", "moe_aux_loss_coeff", "moe_z_loss_coeff",
             "moe_token_dispatcher_type", "moe_grouped_gemm")
# NeMo's defaults where a key is absent (MegatronGPTModel), so old configs read as NeMo read them.
_NEMO_DEFAULTS = {"position_embedding_type": "learned_absolute", "normalization": "layernorm",
                  "activation": "gelu", "bias": True, "share_embeddings_and_output_weights": True,
                  "make_vocab_size_divisible_by": 128}
_NORMS = {"rmsnorm": "RMSNorm"}
_ACTIVATIONS = {"fast-swiglu": "swiglu", "swiglu": "swiglu", "fast-geglu": "geglu"}
_NEMO_ACTIVATIONS = {"swiglu": "fast-swiglu", "geglu": "fast-geglu"}  # fast = tanh GELU


# ----------------------------------------------------------------------------- config
def nemo_config_dict(cfg: GPTModelConfig, tokenizer: Optional[dict] = None,
                     extra_cfg: Optional[dict] = None) -> dict:
    """model_config.yaml content: NeMo key names first, then ours (vocab_size, rope_scaling...)."""
    ours = cfg.to_dict()
    out: dict[str, Any] = {"mcore_gpt": True, "transformer_engine": False}
    out.update({k: ours[k] for k in _SAME_KEYS})
    out.update(normalization="rmsnorm" if cfg.normalization == "RMSNorm" else cfg.normalization,
               activation=_NEMO_ACTIVATIONS.get(cfg.activation, cfg.activation),
               rotary_percentage=cfg.rotary_percent, override_vocab_size=cfg.vocab_size,
               rope_scaling=ours["rope_scaling"],
               scale_positional_embedding=cfg.rope_scaling is not None,
               seq_len_interpolation_factor=None, hidden_dropout=0.0, attention_dropout=0.0,
               ffn_dropout=0.0, apply_query_key_layer_scaling=False, tokenizer=tokenizer)
    if cfg.is_moe:
        out.update({k: ours[k] for k in _MOE_KEYS})
    clash = sorted(set(extra_cfg or {}) & set(out))
    if clash:
        raise ValueError(f"extra_cfg keys {clash} would overwrite architecture keys")
    out.update(extra_cfg or {})
    return out


def model_config_from_nemo(cfg: dict, source: str = CONFIG_NAME) -> GPTModelConfig:
    """GPTModelConfig from a model_config.yaml dict (ours or NeMo's); NeMo defaults apply."""
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "max_position_embeddings"):
        if cfg.get(key) is None:
            raise ValueError(f"{source}: required key {key!r} is missing")
    if cfg.get("seq_len_interpolation_factor") is not None:
        raise ValueError(f"{source}: seq_len_interpolation_factor (linear RoPE scaling) is not "
                         "supported")
    values = {k: cfg.get(k, _NEMO_DEFAULTS.get(k)) for k in _SAME_KEYS}
    values = {k: v for k, v in values.items() if v is not None}
    values.update({k: cfg[k] for k in _MOE_KEYS if k in cfg})
    values.setdefault("encoder_seq_length", cfg["max_position_embeddings"])
    values["vocab_size"] = cfg.get("vocab_size") or cfg.get("override_vocab_size")
    norm = str(cfg.get("normalization", _NEMO_DEFAULTS["normalization"]))
    values["normalization"] = _NORMS.get(norm.lower(), norm)
    act = str(cfg.get("activation", _NEMO_DEFAULTS["activation"]))
    values["activation"] = _ACTIVATIONS.get(act, act)
    values["rotary_percent"] = float(cfg.get("rotary_percent", cfg.get("rotary_percentage", 1.0)))
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        values["rope_scaling"] = RopeScaling(**scaling)
    elif cfg.get("scale_positional_embedding"):  # NeMo's Llama-3.1 flag: megatron's defaults
        values["rope_scaling"] = RopeScaling()
    if values["vocab_size"] is None:
        raise ValueError(f"{source}: neither vocab_size nor override_vocab_size is set")
    model = GPTModelConfig.from_dict(values, source=source)
    model.validate(prefix=source)
    return model


def read_nemo_config(path: str) -> tuple[GPTModelConfig, dict]:
    """(architecture, full resolved model_config.yaml dict) of a .nemo file or extracted dir.

    NeMo-made configs often carry no vocabulary size (NeMo takes it from the tokenizer); then
    the stored embedding's row count is used, padding included, with no further padding.
    """
    text = _read_member(path, CONFIG_NAME).decode("utf-8")
    try:
        from omegaconf import OmegaConf

        full = OmegaConf.to_container(OmegaConf.create(yaml.safe_load(text)), resolve=True)
    except Exception as err:  # yaml or interpolation errors
        raise ValueError(f"{path}: cannot parse {CONFIG_NAME}: {err}") from err
    if not isinstance(full, dict):
        raise ValueError(f"{path}: {CONFIG_NAME} must be a mapping")
    values = dict(full)
    if values.get("vocab_size") is None and values.get("override_vocab_size") is None:
        try:  # without it, model_config_from_nemo names the missing key
            meta = unpickle_metadata(_read_member(path, f"{WEIGHTS_DIR}/.metadata"), path)
            rows = meta.state_dict_metadata[_VOCAB_KEYS[0]].size[0]
            values.update(vocab_size=int(rows), make_vocab_size_divisible_by=1)
        except (ValueError, KeyError, AttributeError):
            pass
    return model_config_from_nemo(values, source=f"{path}:{CONFIG_NAME}"), full


def _read_member(path: str, name: str) -> bytes:
    """Bytes of one member of a .nemo tar (``./`` prefixes allowed) or extracted directory."""
    if os.path.isdir(path):
        if _parts(name) == [CONFIG_NAME]:
            _check_folder(path)
        try:
            with open(os.path.join(path, *_parts(name)), "rb") as f:
                return f.read()
        except OSError as err:
            raise ValueError(f"{path}: cannot read {name}: {err}") from err
    with _archive(path) as tar:
        member = next((m for m in tar.getmembers() if _parts(m.name) == _parts(name)), None)
        if member is None or not member.isfile():
            raise ValueError(f"{path}: no {name} in the archive; not a .nemo file?")
        return tar.extractfile(member).read()


# ----------------------------------------------------------------------------- writing
def nemo_sharded_state_dict(chunks: Sequence[torch.nn.Module],
                            metadata: Optional[dict] = None) -> dict:
    """NeMo's layout: ``model.``-prefixed keys; ``model_{i}`` per virtual pipeline chunk."""
    return chunks_sharded_state_dict(chunks, KEY_PREFIX, metadata)


def save_nemo(path: str, model_cfg: GPTModelConfig, weights, tokenizer_dir: Optional[str],
              extra_cfg: Optional[dict] = None,
              extra_files: Optional[dict[str, bytes]] = None) -> None:
    """Write ``path`` atomically; collective when torch.distributed is up (all ranks call it).

    ``weights``: model chunks of this rank, or a ready sharded state dict with ``model.`` keys.
    ``extra_files``: small additional members, archive name -> content.
    """
    from megatron.core import dist_checkpointing

    model_cfg.validate()
    tokenizer_files = _check_members(tokenizer_dir, extra_files or {})
    sharded = weights if isinstance(weights, dict) else nemo_sharded_state_dict(weights)
    path = os.path.abspath(path)
    staging = None
    if ranks.is_rank_zero():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
        os.makedirs(os.path.join(staging, WEIGHTS_DIR))
    staging = ranks.from_rank0(staging)
    error = None
    try:
        dist_checkpointing.save(sharded, os.path.join(staging, WEIGHTS_DIR))
        if ranks.is_rank_zero():
            _write_members(staging, model_cfg, tokenizer_files, extra_cfg, extra_files or {})
            _write_tar(staging, path)
    except BaseException as err:  # noqa: BLE001 - reported to every rank below
        error = err
    finally:
        if ranks.is_rank_zero() and staging:
            shutil.rmtree(staging, ignore_errors=True)
    failed = ranks.from_rank0(None if error is None else repr(error))
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"writing {path} failed on rank 0: {failed}")


def _check_members(tokenizer_dir: Optional[str], extra_files: dict[str, bytes]) -> list[str]:
    for name in extra_files:
        parts = _parts(name)
        if not parts or ".." in parts or parts[0] in (CONFIG_NAME, WEIGHTS_DIR, TOKENIZER_DIR):
            raise ValueError(f"extra file name {name!r} is invalid or reserved")
    if tokenizer_dir is None:
        return []
    files = sorted(os.path.join(tokenizer_dir, n) for n in os.listdir(tokenizer_dir))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise ValueError(f"tokenizer directory {tokenizer_dir} holds no files")
    return files


def _write_members(staging: str, cfg: GPTModelConfig, tokenizer_files: list[str],
                   extra_cfg: Optional[dict], extra_files: dict[str, bytes]) -> None:
    tokenizer = None
    if tokenizer_files:
        os.makedirs(os.path.join(staging, TOKENIZER_DIR))
        for path in tokenizer_files:
            shutil.copyfile(path, os.path.join(staging, TOKENIZER_DIR, os.path.basename(path)))
        spm = any(os.path.basename(p) == "tokenizer.model" for p in tokenizer_files)
        tokenizer = {"library": "huggingface", "type": f"nemo:{TOKENIZER_DIR}",
                     "model": f"nemo:{TOKENIZER_DIR}/tokenizer.model" if spm else None,
                     "vocab_file": None, "merge_file": None, "delimiter": None, "use_fast": True}
    for name, content in extra_files.items():
        parts = _parts(name)
        os.makedirs(os.path.join(staging, *parts[:-1]), exist_ok=True)
        with open(os.path.join(staging, *parts), "wb") as f:
            f.write(content)
    with open(os.path.join(staging, CONFIG_NAME), "w", encoding="utf-8") as f:
        yaml.safe_dump(nemo_config_dict(cfg, tokenizer, extra_cfg), f, sort_keys=False)


def _write_tar(staging: str, path: str) -> None:
    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.",
                               suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            for root, dirs, files in os.walk(staging):
                dirs.sort()
                for name in sorted(dirs) + sorted(files):
                    full = os.path.join(root, name)
                    tar.add(full, arcname=os.path.relpath(full, staging), recursive=False,
                            filter=clean)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- reading
def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _open_tar(path: str) -> tarfile.TarFile:
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder where a .nemo file is expected, and has no "
                             f"{CONFIG_NAME}: point at a .nemo file or an extracted .nemo folder")
        raise ValueError(f".nemo file not found: {path}")
    try:
        return tarfile.open(path, "r:*")
    except tarfile.TarError as err:
        raise ValueError(f"{path} is not a .nemo file ({os.path.getsize(path)} bytes, not a tar "
                         "archive): it was cut short at its start (an interrupted copy or "
                         f"download?) or is another kind of file ({str(err).splitlines()[0]})"
                         ) from err


@contextlib.contextmanager
def _archive(path: str) -> Iterator[tarfile.TarFile]:
    """The one reader of a .nemo archive: a tar whose members end early (a truncated file)
    fails with one message naming the file and the likely cause, wherever it is read."""
    with _open_tar(path) as tar:
        try:
            yield tar
        except (tarfile.TarError, EOFError, zlib.error) as err:
            raise ValueError(f"{path} is damaged or incomplete ({type(err).__name__}: {err}): "
                             f"the archive ends early ({os.path.getsize(path)} bytes), as an "
                             "interrupted copy, download or save leaves it; copy or export it "
                             "again") from err


def extract_nemo(path: str, dest: str) -> str:
    """Extract into ``dest`` (new or empty); refuse any member that could land outside it."""
    root = _empty_dir(dest)
    with _archive(path) as tar:
        _unpack(tar, _safe_plan(tar, path, dest, root), path)
    return dest


def extract_tokenizer(path: str, dest: str) -> Optional[str]:
    """The tokenizer artifact of a .nemo (``tokenizer.type: nemo:<member>``), without weights.

    A .nemo file: only the artifact's members are extracted into ``dest`` (new or empty), with
    ``extract_nemo``'s checks on every member; returns the artifact's path under ``dest``. An
    extracted folder: returns the artifact's path inside it (nothing copied). ``None`` when the
    .nemo stores no tokenizer (no ``nemo:`` reference, or no such member).
    """
    _, full = read_nemo_config(path)
    ref = (full.get("tokenizer") or {}).get("type")
    if not isinstance(ref, str) or not ref.startswith("nemo:"):
        return None
    if os.path.isdir(path):
        return nemo_artifact(path, ref)
    parts = _artifact_parts(ref)
    root = _empty_dir(dest)
    with _archive(path) as tar:
        plan = [p for p in _safe_plan(tar, path, dest, root) if p[2][:len(parts)] == parts]
        if not plan:
            return None
        _unpack(tar, plan, path)
    return os.path.join(dest, *parts)


def _empty_dir(dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    if os.listdir(dest):
        raise ValueError(f"extraction directory {dest} is not empty")
    return os.path.realpath(dest)


def _safe_plan(tar: tarfile.TarFile, path: str, dest: str, root: str) -> list:
    """(member, target, parts) for every member; refuses the archive if any member is unsafe."""
    plan = []
    for m in tar.getmembers():
        what = f"{path}: member {m.name!r}"
        if m.name.startswith(("/", "\\")) or (len(m.name) > 1 and m.name[1] == ":"):
            raise ValueError(f"{what} has an absolute path; refusing to extract")
        parts = _parts(m.name)
        if ".." in parts:
            raise ValueError(f"{what} climbs out of the archive ('..'); refusing to extract")
        if m.issym() or m.islnk():
            raise ValueError(f"{what} is a link (to {m.linkname!r}); .nemo files hold none")
        if not (m.isfile() or m.isdir()):
            raise ValueError(f"{what} is a device, fifo or other special file; refusing")
        target = os.path.join(root, *parts)
        if parts and os.path.commonpath([root, os.path.realpath(target)]) != root:
            raise ValueError(f"{what} resolves outside {dest}; refusing to extract")
        plan.append((m, target, parts))
    return plan


def _unpack(tar: tarfile.TarFile, plan: list, path: str) -> None:
    for m, target, parts in plan:
        if not parts or m.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            with tar.extractfile(m) as src, open(target, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
        except FileExistsError as err:
            raise ValueError(f"{path}: member {m.name!r} appears twice") from err


# ----------------------------------------------------------------------------- open_nemo
@contextlib.contextmanager
def open_nemo(path: str, extract_dir: Optional[str] = None) -> Iterator[str]:
    """Yield a folder holding the extracted .nemo ``path``; collective under torch.distributed.

    ``path`` a folder (an extracted .nemo): checked for ``model_config.yaml`` and yielded as is.
    ``path`` a .nemo file: extracted once per node, by local rank 0 (``LOCAL_RANK``; every rank
    extracts its own copy when that is unset), into ``<base>/nemo_aot_extract_<id>-<host>``
    (``<id>`` picked by rank 0), where ``<base>`` is ``extract_dir``, else
    ``$NEMO_AOT_EXTRACT_DIR``, else the system temp folder; the other ranks wait. The folder is
    removed after the ``with`` body, once every rank has left it (at once if the body raises).
    Without torch.distributed the one process extracts and removes its copy the same way.

    Every rank must call it, after torch.distributed is initialized (before that, each process
    counts as a node of its own). A failure on any rank (file missing, corrupt, disk full, folder
    not visible to a rank of its node) raises ValueError on every rank. A job killed inside the
    body leaves its ``nemo_aot_extract_*`` folders behind.
    """
    if _agreed_is_folder(path):
        yield path
        return
    with _node_copy(path, _extract_base(extract_dir)) as folder:
        yield folder


def _extract_base(extract_dir: Optional[str]) -> str:
    return os.path.abspath(extract_dir or os.environ.get(EXTRACT_DIR_ENV) or
                           tempfile.gettempdir())


def _check_folder(path: str) -> None:
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ValueError(f"{path} is a folder without {CONFIG_NAME}, so not an extracted .nemo; "
                         "point at a .nemo file or at the folder it was extracted into")


def _agreed_is_folder(path: str) -> bool:
    """Whether ``path`` is an extracted folder (True) or a .nemo file (False), on every rank."""
    problem, kind = None, 1 if os.path.isdir(path) else 2
    try:
        if kind == 1:
            _check_folder(path)
        elif not os.path.isfile(path):
            raise ValueError(f".nemo file not found: {path}")
    except ValueError as err:
        problem, kind = str(err), 0
    low, neg_high = ranks.all_min([kind, -kind])
    if low == 0:
        raise ValueError(ranks.first_error(problem))
    if low != -neg_high:
        raise ValueError(f"{path} is a folder on some ranks and a file on others; give every "
                         "rank the same .nemo file or extracted folder")
    return kind == 1


@contextlib.contextmanager
def _node_copy(path: str, base: str) -> Iterator[str]:
    """One extraction of ``path`` per node under ``base``; every rank yields its node's copy."""
    distributed = torch.distributed.is_initialized()
    local = ranks.local_rank() if distributed else 0
    host, me = ranks.host_name(), ranks.rank()
    name = ranks.broadcast_text(f"nemo_aot_extract_{uuid.uuid4().hex[:16]}" if me == 0 else "")
    folder = os.path.join(base, f"{name}-{host}" if local is not None else f"{name}-{host}-r{me}")
    created: list[bool] = []

    def extract() -> None:
        os.makedirs(base, exist_ok=True)
        os.mkdir(folder)
        created.append(True)
        _extract_into(path, folder)

    error = None
    try:  # LOCAL_RANK unknown: every rank is a node of its own
        ranks.run_polling(extract if local in (0, None) else None)
    except ValueError as err:
        error = f"{host}: {err}"
    except Exception as err:  # noqa: BLE001 - reported to every rank below
        error = (f"{host}: {path}: cannot extract into {folder} ({type(err).__name__}: "
                 f"{err}); set {EXTRACT_DIR_ENV} to a folder this job can write")
    try:
        message = ranks.first_error(error)
        if message is None:
            visible = os.path.isfile(os.path.join(folder, CONFIG_NAME))
            message = ranks.first_error(None if visible else (
                f"{host}: {path}: this rank does not see {folder}, which its node's local "
                "rank 0 extracted; are LOCAL_RANK and the host names right?"))
        if message is not None:
            raise ValueError(message)
        yield folder
    except BaseException:
        if created:  # no barrier: ranks that did not fail may never reach one
            shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        ranks.barrier()  # nobody reads the folder any more
    finally:
        if created:
            shutil.rmtree(folder, ignore_errors=True)


def _extract_into(path: str, folder: str) -> None:
    """extract_nemo, with I/O and archive errors as ValueError naming the file and the fix."""
    try:
        extract_nemo(path, folder)
    except ValueError:
        raise
    except OSError as err:  # disk full, permissions (gzip.BadGzipFile is one too)
        raise ValueError(f"{path}: extracting into {folder} failed ({err}); it needs about the "
                         f".nemo's size free: set {EXTRACT_DIR_ENV} to a folder with room, or "
                         "pass a pre-extracted .nemo folder") from err
    except Exception as err:  # noqa: BLE001 - tarfile/zlib/EOF errors of a damaged file
        raise ValueError(f"{path} is damaged or incomplete ({type(err).__name__}: {err}); "
                         "copy or export it again") from err


def weights_dir(extracted_dir: str) -> str:
    """``model_weights/`` of an extracted .nemo, checked to be a torch_dist dist checkpoint."""
    wdir = os.path.join(extracted_dir, WEIGHTS_DIR)
    if not os.path.isdir(wdir):
        old = os.path.exists(os.path.join(extracted_dir, "model_weights.ckpt"))
        raise ValueError(f"{extracted_dir}: no {WEIGHTS_DIR}/ dist checkpoint" + (
            "; model_weights.ckpt is a pre-dist-checkpoint NeMo file (pickled), re-save it with "
            "a NeMo version that writes dist checkpoints" if old else ""))
    return check_dist_checkpoint(wdir)


def checkpoint_dtype(extracted_dir: str) -> torch.dtype:
    """Storage dtype of the weights (that of the word embedding)."""
    meta = read_checkpoint_metadata(weights_dir(extracted_dir))
    entry = meta.state_dict_metadata.get(_VOCAB_KEYS[0])
    if entry is None or not hasattr(entry, "properties"):
        raise ValueError(f"{extracted_dir}: no {_VOCAB_KEYS[0]} tensor in the checkpoint")
    return entry.properties.dtype


def load_nemo_weights(chunks: Sequence[torch.nn.Module], extracted_dir: str,
                      select=None) -> None:
    """Load model_weights/ into this rank's chunks (any TP/PP layout; collective); ``select``
    as in ``load_dist_weights``."""
    load_dist_weights(chunks, weights_dir(extracted_dir), KEY_PREFIX, select)


def nemo_artifact(extracted_dir: str, ref: Optional[str]) -> Optional[str]:
    """Resolve a config reference ``nemo:<member>`` to a path inside ``extracted_dir``."""
    if not isinstance(ref, str) or not ref.startswith("nemo:"):
        return None
    path = os.path.join(extracted_dir, *_artifact_parts(ref))
    return path if os.path.exists(path) else None


def _artifact_parts(ref: str) -> list[str]:
    parts = _parts(ref[len("nemo:"):])
    if not parts or ".." in parts:
        raise ValueError(f"artifact reference {ref!r} is invalid")
    return parts


__all__ = ["save_nemo", "read_nemo_config", "extract_nemo", "open_nemo", "extract_tokenizer",
           "load_nemo_weights",
           "nemo_sharded_state_dict", "nemo_config_dict", "model_config_from_nemo",
           "checkpoint_dtype", "read_checkpoint_metadata", "weights_dir", "nemo_artifact",
           "load_dist_weights", "check_dist_checkpoint",
           "CONFIG_NAME", "WEIGHTS_DIR", "TOKENIZER_DIR", "KEY_PREFIX", "EXTRACT_DIR_ENV"]
