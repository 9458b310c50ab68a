"""Where a checkpoint comes from: a ``.nemo``, a Hugging Face model folder, or a hub id.

Every place that takes a starting checkpoint (``init_from`` of ``nemo-aot train``, ``nemo-aot
score --model``, ``nemo-aot convert hf-to-nemo --hf``) names it one of three ways:

* a ``.nemo`` file or an extracted ``.nemo`` folder (``model_config.yaml``): used as is;
* a Hugging Face model folder (``config.json``, safetensors, tokenizer files);
* a hub id ``org/name`` or ``org/name@revision`` (a branch, tag or commit), resolved through
  ``huggingface_hub``: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE`` and its
  tokens (``HF_TOKEN``, ``hf auth login``). A local path wins over a hub id of the same name.

A tokenizer (``data.tokenizer_path``, ``score``/``generate --tokenizer``) and a PEFT adapter
(``peft.adapter_from``) may be hub ids too (``local_or_hub_folder``): only their own files are
fetched.

The architecture alone (``read_architecture``: printing a config, ``--plan``) comes from
``config.json``; for a hub id that one file is fetched, never the weights. Loading weights
(``local_nemo``) converts a Hugging Face source once and keeps the ``.nemo`` in the converted
cache, ``$NEMO_AOT_CACHE`` (default ``$HF_HOME/nemo_aot``): ``converted/<models--org--name>/
<commit>-<dtype>.nemo`` for a hub id (keyed by repo and resolved commit), ``converted/folders/
<name>-<digest>-<dtype>.nemo`` for a folder (keyed by its path and its files' sizes and times).
Delete the folder to clear it. The dtype is the source's (``torch_dtype``/``dtype`` float32:
fp32, anything else: bf16).

Ranks: this runs while a run is resolved, before torch.distributed exists, on every rank. One
process per cache entry downloads and converts, under an exclusive file lock beside the entry;
the others block on the lock and then read the finished file (written to a temporary name and
renamed, so a reader never sees half a file). With the cache on a node-local disk each node
converts once; on a shared file system, once for the job (where the file system refuses
locks, each process without a finished copy converts its own and renames it into place).
The conversion runs in a child process of one rank (megatron's single-process world cannot be
built inside a launched rank).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

logger = logging.getLogger(__name__)

CACHE_ENV = "NEMO_AOT_CACHE"
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+))?$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_DOWNLOAD = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
_KIND_FILES = {"tokenizer": ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"),
               "adapter": ("*.json", "*.safetensors")}
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
               "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR",
               "MASTER_PORT")
# torchrun's TORCHELASTIC_USE_AGENT_STORE would make the child join the launch's store (a hang)
_LAUNCH_PREFIXES = ("TORCHELASTIC_",)


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint as the user named it, classified without touching the network."""

    spec: str
    """What the user wrote (a ``bundled:`` path expanded by the caller)."""
    kind: str
    """``nemo`` (a .nemo file or extracted folder), ``hf`` (a model folder) or ``hub``."""
    path: Optional[str] = None
    """The local file or folder (``nemo``, ``hf``); None for a hub id."""
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    """The hub revision asked for (None: the default branch)."""

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.repo_id}@{self.revision or 'main'} (Hugging Face hub)"
        return f"{self.path} ({'.nemo' if self.kind == 'nemo' else 'Hugging Face folder'})"


def checkpoint_source(spec: str, key: str = "init_from") -> CheckpointSource:
    """Classify ``spec``: an existing path (.nemo file, extracted .nemo folder, HF folder),
    else a hub id; anything else is a ValueError naming ``key``."""
    from nemo_aot.models.nemo_format import CONFIG_NAME

    path = str(spec).strip()
    if os.path.isfile(path):
        return CheckpointSource(spec, "nemo", path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            return CheckpointSource(spec, "nemo", path)
        if os.path.isfile(os.path.join(path, "config.json")):
            return CheckpointSource(spec, "hf", path)
        raise ValueError(f"{key}: {spec} is a folder with neither {CONFIG_NAME} (an extracted "
                         ".nemo) nor config.json (a Hugging Face model folder)")
    match = HUB_ID.match(str(spec).strip())
    if match and not path.endswith(".nemo"):
        return CheckpointSource(spec, "hub", repo_id=match["repo"], revision=match["revision"])
    raise ValueError(f"{key}: {spec} does not exist; give a .nemo file, an extracted .nemo "
                     "folder, a Hugging Face model folder or a hub id (org/name[@revision])")


def read_architecture(source: CheckpointSource):
    """The model config (``GPTModelConfig``) of ``source``, from its config alone: a .nemo's
    ``model_config.yaml``, else ``config.json`` (for a hub id that file only is fetched)."""
    from nemo_aot.conversion.architectures import model_config_from_hf
    from nemo_aot.conversion.hf_io import read_json
    from nemo_aot.models.nemo_format import read_nemo_config

    if source.kind == "nemo":
        return read_nemo_config(source.path)[0]
    config = (os.path.join(source.path, "config.json") if source.kind == "hf"
              else _hub_config(source))
    return model_config_from_hf(read_json(config, "the Hugging Face config"), source=config)[1]


def local_nemo(source: CheckpointSource, key: str = "init_from") -> str:
    """A local .nemo of ``source``: itself, or the converted cache's copy (converted now if
    missing, by one process while the others wait)."""
    if source.kind == "nemo":
        return source.path
    if source.kind == "hf":
        folder = source.path
        target = os.path.join(cache_dir(), "converted", "folders",
                              f"{_safe(os.path.basename(os.path.abspath(folder)))}-"
                              f"{_fingerprint(folder)}-{_dtype(folder)}.nemo")
        with _locked(target):
            if not os.path.isfile(target):
                _convert(folder, target, _dtype(folder), source)
        return target
    folder = hub_folder(source, key, weights=True)  # the commit is in the snapshot's name
    repo = "models--" + source.repo_id.replace("/", "--")
    target = os.path.join(cache_dir(), "converted", repo,
                          f"{os.path.basename(folder)}-{_dtype(folder)}.nemo")
    with _locked(target):
        if not os.path.isfile(target):
            _convert(folder, target, _dtype(folder), source)
    return target


def hf_folder(source: CheckpointSource, key: str = "--hf") -> str:
    """A local Hugging Face model folder with weights: the folder itself or the hub snapshot
    (downloaded now unless cached or offline)."""
    if source.kind == "nemo":
        raise ValueError(f"{key}: {source.spec} is a .nemo, not a Hugging Face model")
    return source.path if source.kind == "hf" else hub_folder(source, key, weights=True)


def cache_dir() -> str:
    """Where converted copies are kept: ``$NEMO_AOT_CACHE``, else ``$HF_HOME/nemo_aot``."""
    from huggingface_hub import constants

    return os.path.abspath(os.environ.get(CACHE_ENV) or os.path.join(constants.HF_HOME,
                                                                     "nemo_aot"))


def hub_folder(source: CheckpointSource, key: str, weights: bool) -> str:
    """The snapshot folder of a hub id (config, tokenizer and, with ``weights``, safetensors)."""
    folder = _snapshot(source, key, _DOWNLOAD)
    if weights and not any(os.path.isfile(os.path.join(folder, n)) for n in _WEIGHTS):
        raise ValueError(f"{key}: the cached snapshot of {source.repo_id} ({folder}) holds no "
                         f"safetensors weights (only its config was fetched, or the download was "
                         f"cut); fill it with `{_download_command(source)}`")
    return folder


def local_or_hub_folder(spec: str, key: str, kind: str) -> str:
    """A local folder for ``spec``, a tokenizer (``kind="tokenizer"``) or a PEFT adapter
    (``"adapter"``): the path itself when it exists, or when it is no hub id (the caller's own
    check then names it); else the snapshot of the hub id ``org/name[@revision]`` holding that
    kind's files only (never a model's weights), fetched now unless cached or offline."""
    path = str(spec).strip()
    match = HUB_ID.match(path)
    if os.path.exists(path) or not match or path.endswith(".nemo"):
        return spec
    source = CheckpointSource(spec, "hub", repo_id=match["repo"], revision=match["revision"])
    folder = _snapshot(source, key, _KIND_FILES[kind])
    logger.info("%s: %s is %s", key, source.describe(), folder)
    return folder


def _snapshot(source: CheckpointSource, key: str, patterns) -> str:
    """``snapshot_download`` of the files matching ``patterns``, one process per node at a
    time, its errors as one ValueError naming ``key``."""
    from huggingface_hub import snapshot_download

    lock = os.path.join(cache_dir(), "downloads",
                        "models--" + source.repo_id.replace("/", "--"))
    with _hub_errors(source, key), _locked(lock):
        return snapshot_download(source.repo_id, revision=source.revision,
                                 allow_patterns=list(patterns))


def _hub_config(source: CheckpointSource) -> str:
    from huggingface_hub import hf_hub_download

    with _hub_errors(source, "init_from"):
        return hf_hub_download(source.repo_id, "config.json", revision=source.revision)


@contextmanager
def _hub_errors(source: CheckpointSource, key: str) -> Iterator[None]:
    """huggingface_hub's errors as one ValueError naming the id, the cache and the fix."""
    from huggingface_hub import constants, errors

    try:
        yield
    except errors.LocalEntryNotFoundError as err:
        offline = constants.HF_HUB_OFFLINE
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline else
               f"it is not in the local cache and the hub could not be reached ({err})")
        raise ValueError(f"{key}: {source.describe()}{_not_a_path(source)}: {why} "
                         f"({constants.HF_HUB_CACHE}); fill "
                         f"the cache on a machine with network access (same HF_HOME) with "
                         f"`{_download_command(source)}`") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
            errors.GatedRepoError, errors.EntryNotFoundError) as err:
        raise ValueError(f"{key}: {source.describe()}{_not_a_path(source)}: "
                         f"{type(err).__name__}: "
                         f"{str(err).splitlines()[0]} (private or gated: set HF_TOKEN or run "
                         "`hf auth login`)") from None


def _not_a_path(source: CheckpointSource) -> str:
    return f" (no local path {source.spec} exists, so it was taken as a hub id)"


def _download_command(source: CheckpointSource) -> str:
    args = f"{source.repo_id}{f' --revision {source.revision}' if source.revision else ''}"
    return f"hf download {args}` (huggingface_hub < 1.0: `huggingface-cli download {args}"


@contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path.lock`` (processes of this node, and of all nodes where the
    file system honours flock)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # e.g. Lustre mounted without flock: correct, only not shared
            logger.warning("%s: the file system refuses locks (%s); processes that find no "
                           "finished copy each make their own (renamed into place)", path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(folder: str, target: str, dtype: str, source: CheckpointSource) -> None:
    """``nemo-aot convert hf-to-nemo`` in a child process without the launch's rank variables,
    into a temporary name renamed into place."""
    temporary = f"{target}.partial-{socket.gethostname()}-{os.getpid()}"
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_ENV and not k.startswith(_LAUNCH_PREFIXES)}
    command = [sys.executable, "-m", "nemo_aot.conversion.cli", "convert", "hf-to-nemo",
               "--hf", folder, "--out", temporary, "--dtype", dtype]
    logger.info("converting %s to %s (once; later runs reuse it)", source.describe(), target)
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        if os.path.exists(temporary):
            os.remove(temporary)
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ValueError(f"{source.describe()}: conversion to .nemo failed: {reason}")
    os.replace(temporary, target)


def _dtype(folder: str) -> str:
    from nemo_aot.conversion.hf_io import read_json

    config = read_json(os.path.join(folder, "config.json"), "the Hugging Face config")
    return "fp32" if (config.get("torch_dtype") or config.get("dtype")) == "float32" else "bf16"


def _fingerprint(folder: str) -> str:
    """The folder's real path and its files' names, sizes and modification times."""
    digest = hashlib.sha256(os.path.realpath(folder).encode())
    for name in sorted(os.listdir(folder)):
        stat = os.stat(os.path.join(folder, name))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "model"


__all__ = ["CheckpointSource", "checkpoint_source", "read_architecture", "local_nemo",
           "hf_folder", "hub_folder", "local_or_hub_folder", "cache_dir", "CACHE_ENV"]
