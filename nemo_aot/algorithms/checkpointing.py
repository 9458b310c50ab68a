"""Crash-safe checkpoint folders and the RNG state bundle.

Layout under ``root``::

    step_00000100/            a complete checkpoint (payload + COMPLETE.json)
    step_00000200/
    .tmp_step_00000300/       a save in progress, or one killed mid-write (cleaned later)

Contract of ``CheckpointManager.save(step, write_fn, metadata)``, called on every rank:
1. rank 0 creates ``.tmp_step_N`` (removing a stale one); all ranks barrier;
2. every rank runs ``write_fn(tmp_dir)`` (e.g. a synchronous megatron-core dist checkpoint save
   into the empty folder; it must return once its files are written) and fsyncs its node's
   share of the files; the ranks agree that every write succeeded (a failure on any rank
   raises on all ranks, instead of one rank hanging in a barrier);
3. rank 0 writes ``COMPLETE.json`` (step, time, metadata such as consumed samples and the
   config hash), fsyncs it, renames the folder to ``step_N`` in one ``rename`` and fsyncs
   ``root``; then deletes complete checkpoints beyond ``keep_last`` (rename first, then delete,
   so a half-deleted folder never looks complete); all ranks barrier.
So a ``step_*`` folder exists only once its payload and marker are on disk: a kill -9 at any
moment leaves the previous checkpoint intact. ``latest_valid()`` returns the newest ``step_*``
folder whose marker parses and names its step, identical on all ranks (rank 0 decides and
broadcasts), and lets rank 0 remove leftovers of killed saves. Multi-node runs need ``root``
on a filesystem every node sees (as megatron dist checkpoints do).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from nemo_aot.distributed.ranks import any_rank, is_rank_zero

log = logging.getLogger(__name__)

# megatron imported lazily: `nemo-aot --help` and config validation must not load it.

MARKER = "COMPLETE.json"
CONFIG_FILE = "config.yaml"  # in the run folder and every checkpoint: the resolved config
TOKENIZER_COPY = "tokenizer"  # in every checkpoint: the tokenizer the run trained with
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_LEFTOVER = re.compile(r"^\.(tmp|trash)_step_\d+(\.\d+)?$")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SavedCheckpoint:
    """A complete checkpoint: its folder, step and the metadata stored in its marker."""

    path: str
    step: int
    metadata: dict


def _dist():
    available = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed if available else None


class CheckpointManager:
    """Atomic step_N checkpoint folders under ``root`` with keep-last-K pruning."""

    def __init__(self, root: str, keep_last: Optional[int] = 2, group=None, fsync: bool = True):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1 (or None to keep all), got "
                             f"{keep_last}")
        self.root = os.path.abspath(root)
        self.keep_last = keep_last
        self.group = group
        self.fsync = fsync

    # ------------------------------------------------------------------ ranks
    def _rank(self) -> int:
        dist = _dist()
        return dist.get_rank(self.group) if dist else 0

    def _barrier(self) -> None:
        dist = _dist()
        if dist:
            dist.barrier(group=self.group)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    # ------------------------------------------------------------------ save
    def save(self, step: int, write_fn: Callable[[str], Any],
             metadata: Optional[dict] = None) -> str:
        """Write checkpoint ``step`` on all ranks; returns its final folder."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
        rank = self._rank()
        tmp = os.path.join(self.root, f".tmp_step_{step:08d}")
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        self._barrier()
        error: Optional[BaseException] = None
        try:
            write_fn(tmp)
            if self.fsync:
                _fsync_tree(tmp)
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = err
        if any_rank(error is not None, self.group):
            full = error is not None and _no_space(error)
            if any_rank(full, self.group):
                if rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)  # give the space back
                raise DiskFullError(self._disk_full_message(step, tmp))
            if error is not None:
                raise error
            raise RuntimeError(f"checkpoint step {step}: another rank failed while writing {tmp}")
        if rank == 0:
            self._publish(step, tmp, metadata or {})
            self._prune()
        self._barrier()
        return self.step_dir(step)

    def _publish(self, step: int, tmp: str, metadata: dict) -> None:
        # The manager's step and time win over same-named metadata keys: the marker must name
        # its own folder for latest_valid() to accept it.
        marker = {**metadata, "format_version": FORMAT_VERSION, "step": step, "time": time.time(),
                  "files": manifest(tmp)}
        _write_json_durably(os.path.join(tmp, MARKER), marker)
        final = self.step_dir(step)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): swap atomically
            self._discard(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)

    def _disk_full_message(self, step: int, tmp: str) -> str:
        previous = self.complete()
        free = shutil.disk_usage(self.root).free
        if previous:
            last = previous[-1]
            size = folder_bytes(last.path)
            kept = (f"checkpoint step {last.step} ({last.path}) is intact, so nothing is lost; "
                    f"a checkpoint of this run takes about {_gib(size)}")
        else:
            kept = "no earlier checkpoint exists"
        return (f"no space left on the device of {self.root} while writing checkpoint step "
                f"{step} ({_gib(free)} free now, the partial {tmp} removed); {kept}. Free space "
                f"there (or set checkpoint.dir to a larger filesystem) and run the same command "
                f"again to resume")

    def free_space_problem(self) -> Optional[str]:
        """Before a (resumed) run: whether the next save would fit, judged by the newest
        complete checkpoint's size; None when it fits or nothing is known."""
        previous = self.complete()
        if not previous:
            return None
        need, free = folder_bytes(previous[-1].path), shutil.disk_usage(self.root).free
        if free >= need:
            return None
        return (f"{self.root} has {_gib(free)} free, but a checkpoint of this run (step "
                f"{previous[-1].step}) takes {_gib(need)}: the next save would fail. Free at least "
                f"{_gib(need - free)} there (or set checkpoint.dir to a larger filesystem), "
                f"then resume")

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for ckpt in self.complete()[:-self.keep_last]:
            self._discard(ckpt.path)

    def _discard(self, path: str) -> None:
        # Rename first: the folder stops being a step_* checkpoint atomically, then delete.
        trash = os.path.join(self.root, f".trash_{os.path.basename(path)}.{time.time_ns()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ find
    def complete(self, problems: Optional[list] = None) -> list[SavedCheckpoint]:
        """Complete checkpoints under root, oldest first (this rank's view of the filesystem):
        a marker that parses and names its step, and every file its manifest lists, at its
        size. ``problems`` collects (folder, what is wrong) for the step folders that fail."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            match = _STEP_DIR.match(name)
            if not match:
                continue
            path = os.path.join(self.root, name)
            meta = read_marker(path)
            if meta is None or meta.get("step") != int(match.group(1)):
                bad = f"its {MARKER} is missing or unreadable"
            else:
                bad = verify_manifest(path, meta)
            if bad is None:
                found.append(SavedCheckpoint(path, meta["step"], meta))
            elif problems is not None:
                problems.append((path, bad))
        return sorted(found, key=lambda c: c.step)

    def latest_valid(self) -> Optional[SavedCheckpoint]:
        """The newest complete checkpoint (the same on every rank), or None. A step folder
        newer than it that is damaged (truncated or missing files, an unreadable marker) is
        named in a warning and left in place."""
        rank = self._rank()
        latest = None
        if rank == 0:
            self.remove_leftovers()
            problems: list = []
            complete = self.complete(problems)
            latest = complete[-1] if complete else None
            for path, bad in sorted(problems):
                if latest is None or path > latest.path:
                    log.warning("checkpoint %s is damaged (%s): resuming from %s instead",
                                path, bad, latest.path if latest else "the start (no other "
                                "complete checkpoint)")
        dist = _dist()
        if dist:
            box = [latest]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0)
                                       if self.group is not None else 0, group=self.group)
            latest = box[0]
        return latest

    def remove_leftovers(self) -> list[str]:
        """Delete temporary/trash folders of killed saves (call on one rank, not during a save)."""
        if not os.path.isdir(self.root):
            return []
        removed = [os.path.join(self.root, n) for n in os.listdir(self.root) if _LEFTOVER.match(n)]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed


class DiskFullError(ValueError):
    """A checkpoint did not fit on its filesystem (the previous checkpoints are intact)."""


def manifest(folder: str) -> dict[str, int]:
    """{relative path: size in bytes} of every file under ``folder`` (the marker excluded)."""
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, folder)
            if rel != MARKER:
                files[rel] = os.path.getsize(path)
    return files


def verify_manifest(folder: str, meta: dict) -> Optional[str]:
    """What is wrong with ``folder`` against its marker's manifest, or None (also for
    checkpoints written before manifests were kept)."""
    listed = meta.get("files")
    if not isinstance(listed, dict):
        return None
    for rel, size in sorted(listed.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{rel} has {actual} bytes, {size} were written (truncated or overwritten)"
    return None


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder)
               for n in names)


def _no_space(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a full disk or quota."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


def read_marker(path: str) -> Optional[dict]:
    """The metadata of a checkpoint folder, or None if its marker is missing or unreadable."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None


def find_checkpoint(path: str, step: Optional[int] = None) -> str:
    """The checkpoint folder ``path`` names: itself if it is one (marker present), else the
    complete checkpoint of ``step`` (default: the newest) under ``path`` or ``path/checkpoints``."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path} does not exist or is not a folder")
    marker = read_marker(path)
    if marker is not None:
        if step is not None and marker["step"] != step:
            raise ValueError(f"{path} is the checkpoint of step {marker['step']}, not --step "
                             f"{step}; pass its parent folder to choose a step")
        bad = verify_manifest(path, marker)
        if bad is not None:
            raise ValueError(f"checkpoint {path} is damaged: {bad}. It was changed after it was "
                             "written (a partial copy, a full disk, a storage fault); export an "
                             "earlier step (--step) from its parent folder")
        return path
    if os.path.exists(os.path.join(path, MARKER)):
        raise ValueError(f"{path}: its {MARKER} is unreadable, so the checkpoint is incomplete")
    problems: list = []
    for root in (path, os.path.join(path, "checkpoints")):
        complete = CheckpointManager(root, keep_last=None).complete(problems)  # read-only
        if complete:
            break
    else:
        raise ValueError(f"no complete checkpoint under {path} (a checkpoint folder holds "
                         f"{MARKER}; pass a run's checkpoints/ folder or one step folder)")
    for bad_path, bad in sorted(problems):
        if step is None and bad_path > complete[-1].path or \
                step is not None and bad_path.endswith(f"step_{step:08d}"):
            log.warning("checkpoint %s is damaged (%s); skipped", bad_path, bad)
    if step is None:
        return complete[-1].path
    chosen = [c.path for c in complete if c.step == step]
    if not chosen:
        raise ValueError(f"no complete checkpoint of step {step} under {root}; complete steps: "
                         f"{[c.step for c in complete]}")
    return chosen[0]


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.1f} MiB"


def _write_json_durably(path: str, payload: dict) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(partial, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync the files under path: each node must flush what its ranks wrote, and cannot tell
    which files those are, so the local ranks of a node split all files between them."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or 1
    if "LOCAL_WORLD_SIZE" not in os.environ:
        local_rank = 0  # unknown node layout: this rank flushes everything
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for name in files[local_rank::local_world]:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if local_rank == 0:
        for directory, _, _ in os.walk(path):
            _fsync_dir(directory)


# ---------------------------------------------------------------------- a run's state


class RunCheckpointer:
    """What a training run saves and restores, declared once (as torchtitan's checkpointer owns
    model, optimizer, schedulers and train state): the model's and the optimizer's sharded
    state, every rank's RNG streams, and the common state (LR scheduler, train state, sampler
    position); plus, for ``nemo-aot export``, the run's resolved config and tokenizer files.
    Folders, atomicity and pruning are ``CheckpointManager``'s."""

    def __init__(self, manager: CheckpointManager, model, optimizer, scheduler, train_batches, *,
                 config_text: str, config_hash: str, tokenizer_dir: str):
        self.manager, self.model, self.optimizer = manager, model, optimizer
        self.scheduler, self.train_batches = scheduler, train_batches
        self.config_text, self.config_hash = config_text, config_hash
        self.tokenizer_dir = tokenizer_dir
        self.resume_record: Optional[dict] = None
        """The config changes this run resumed with (resume_check.record), kept in markers."""

    def _template(self, is_loading: bool) -> dict:
        model_sd = self.model.sharded_state_dict()
        return {"model": model_sd,
                # megatron-LM's default layout for distributed-optimizer state (resume at the same
                # DP size; other optimizers ignore it)
                "optimizer": self.optimizer.sharded_state_dict(
                    model_sd, is_loading=is_loading,
                    metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
                "rng": sharded_rng_state()}

    def save(self, trainer) -> None:
        """Checkpoint ``trainer.state.step`` (collective: every rank calls it)."""
        from megatron.core import dist_checkpointing

        common = {"scheduler": self.scheduler.state_dict(), "train": trainer.state.to_dict(),
                  "sampler": self.train_batches.state_dict()}

        def write(tmp_dir: str) -> None:
            state = self._template(is_loading=False)
            state["common"] = common
            dist_checkpointing.save(state, tmp_dir)
            if is_rank_zero():  # self-describing: `nemo-aot export` rebuilds the policy from it
                write_text(os.path.join(tmp_dir, CONFIG_FILE), self.config_text)
                _copy_files(self.tokenizer_dir, os.path.join(tmp_dir, TOKENIZER_COPY))

        metadata = {**trainer.state.to_dict(), "config_hash": self.config_hash,
                    "megatron_core": megatron_core_version()}
        if self.resume_record is not None:
            metadata["resumed_with_config_changes"] = self.resume_record
        self.manager.save(trainer.state.step, write, metadata=metadata)

    def restore(self, checkpoint: SavedCheckpoint, trainer) -> None:
        """Load ``checkpoint`` into the model, optimizer, RNG, scheduler, sampler and
        ``trainer.state`` (collective)."""
        from megatron.core import dist_checkpointing

        materialize_optimizer_state(self.optimizer)
        try:
            state = dist_checkpointing.load(self._template(is_loading=True), checkpoint.path)
            self.model.load_sharded_state(state["model"])
            with torch.no_grad():  # the distributed optimizer copies into views of its params
                self.optimizer.load_state_dict(state["optimizer"])
        except Exception as err:
            reason = newer_megatron_reason(checkpoint.metadata.get("megatron_core"),
                                           checkpoint.path)
            if reason is None:
                raise
            raise RuntimeError(f"{checkpoint.path} could not be loaded: {reason}") from err
        for group in self.optimizer.param_groups:  # the stored groups carry the stored LR range
            for key in ("max_lr", "min_lr"):
                if key in group:
                    group[key] = getattr(self.scheduler, key)
        _restore_step_counts(self.optimizer)
        restore_rng_state(state["rng"])
        # The run's own LR schedule at the checkpoint's step: equal to the stored one unless the
        # resume changed optim.* or the run's length (resume_check allowed and recorded it).
        self.scheduler.override_opt_param_scheduler = True
        self.scheduler.load_state_dict(state["common"]["scheduler"])
        self.train_batches.load_state_dict(state["common"]["sampler"])
        for k, v in state["common"]["train"].items():
            setattr(trainer.state, k, v)


def megatron_core_version() -> str:
    """Recorded in every checkpoint's marker: which megatron-core wrote it (its distribution's
    version: ``package_info.__version__`` appends the commit of any git repository around the
    installed files)."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:  # a source tree on the path
        from megatron.core import package_info

        return ".".join(map(str, package_info.VERSION[:3])) + str(package_info.VERSION[3])


def newer_megatron_reason(saved: Optional[str], path: str = "") -> Optional[str]:
    """Why a checkpoint written by megatron-core ``saved`` may not load here: None unless it
    comes from a newer release than the installed one (older checkpoints load forward, checked
    by the compatibility tier; checkpoints from before the version was recorded say nothing)."""
    from packaging.version import Version

    if not saved:
        return None
    installed = megatron_core_version()
    if Version(saved).release[:2] <= Version(installed).release[:2]:
        return None
    detail = "whose checkpoint format or optimizer layout may lack what it saved"
    if path and not os.path.exists(os.path.join(path, "common.pt")):
        # megatron-core 0.19 moved the common (unsharded) state into the torch_dist files
        detail = ("which reads the common (unsharded) state from a common.pt file; this "
                  "checkpoint keeps it inside its torch_dist files, as megatron-core 0.19+ do")
    return (f"it was written by megatron-core {saved}, and this environment has the older "
            f"{installed}, {detail}. Resume it with megatron-core >= {saved} (as the "
            "environment that wrote it), or start a new run from its policy (nemo-aot export).")


def materialize_optimizer_state(optimizer) -> None:
    """Give a fresh megatron distributed optimizer the state its checkpoint template is built
    from. On torch's Adam (no Apex/TE: CPU hosts, containers without them) megatron reads the
    step count from existing per-parameter state, which a new optimizer does not have yet
    (``assert len(steps) == 1``). One step on zero gradients at lr 0 creates it without moving
    anything; the checkpoint then overwrites moments, master weights and the step count."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if type(part).__name__ != "DistributedOptimizer" or inner is None or inner.state:
            continue
        rates = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        with torch.no_grad():
            inner.step()
        inner.zero_grad(set_to_none=True)
        for group, rate in zip(inner.param_groups, rates):
            group["lr"] = rate


def _restore_step_counts(optimizer) -> None:
    """megatron's distributed optimizer on torch's Adam keeps the step count in its param
    groups (``step``) and, on load, hands every parameter one shared tensor that is then
    overwritten with the count of the fresh optimizer; torch's Adam would also add 1 to a shared
    tensor once per parameter. Give each parameter its own count, the checkpoint's."""
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if type(part).__name__ != "DistributedOptimizer" or inner is None:
            continue
        for group in inner.param_groups:
            if "step" not in group:  # Apex/TE Adam: the count lives in the group itself
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state is not None and torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _copy_files(source: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dest, name))


# ---------------------------------------------------------------------- RNG state bundle


def capture_rng_state() -> dict:
    """This rank's RNG states: python, numpy, torch CPU, every CUDA device, and megatron's
    model-parallel CUDA RNG tracker when megatron is already in use."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if "megatron.core" in sys.modules:  # never import megatron just for this
        from megatron.core import tensor_parallel

        tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
        if tracker_states:
            state["megatron_tracker"] = tracker_states
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``; refuses a bundle from a machine with other devices."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(state["torch_cuda"]):
            raise ValueError("the checkpoint's RNG state holds CUDA generators for "
                             f"{len(state['torch_cuda'])} devices, this process sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; "
                             "resume on the same kind of node, or skip the RNG state")
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def sharded_rng_state(key: str = "rng_state"):
    """This rank's RNG bundle as a megatron ``ShardedObject`` for a dist checkpoint: one entry
    per (pipeline, tensor, data) parallel rank, so every rank restores its own stream. Loading it
    needs the same layout; after a layout change, resume without it."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject(key, capture_rng_state(), shape, offset, replica_id=0)


__all__ = ["CheckpointManager", "RunCheckpointer", "SavedCheckpoint", "find_checkpoint",
           "read_marker", "MARKER", "DiskFullError", "manifest", "verify_manifest",
           "CONFIG_FILE", "TOKENIZER_COPY", "capture_rng_state", "restore_rng_state",
           "sharded_rng_state", "write_text"]
