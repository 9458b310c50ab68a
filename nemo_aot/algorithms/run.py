"""Wire a ``ResolvedRun`` into a training run: parallel state, data, model, reference,
optimizer, checkpoints, logging; then fit, and export the policy as a ``.nemo``.

Every rank runs ``run_training``; rank 0 alone writes logs, plots and the final export.

Preemption (SIGTERM/SIGUSR1) is honoured from the first line: a signal during data loading,
weight loading or reference scoring stops every rank at the next agreed point without training;
one during training saves a checkpoint after the step. A run stopped by a signal or by the time
budget does not export (a large .nemo can outlast the grace period); its result says why it
stopped, so the launcher's status file tells the sbatch script to requeue, and the requeued
job resumes and exports at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Any, Optional

import torch

from nemo_aot.algorithms.adapters import ADAPTER_DIR, export_adapter, load_adapter_from
from nemo_aot.algorithms.checkpointing import (
    CONFIG_FILE,
    CheckpointManager,
    RunCheckpointer,
    write_text,
)
from nemo_aot.algorithms.reporting import RunReporter
from nemo_aot.algorithms.rules import check_data_kind
from nemo_aot.algorithms.run_lock import RunLock
from nemo_aot.algorithms.signals import PreemptionHandler
from nemo_aot.algorithms.trainer import COMPLETE_REASONS, AOTTrainer, build_optimizer
from nemo_aot.conversion.sources import local_or_hub_folder
from nemo_aot.data import load_preference_data, load_tokenizer, make_batches
from nemo_aot.data.collate import slot_efficiency
from nemo_aot.data.config import resolve_path
from nemo_aot.data.tokenization import check_tokenizer_fits
from nemo_aot.distributed.parallel import initialize_model_parallel
from nemo_aot.distributed.ranks import StopRequested, from_rank0, rank, stop_point
from nemo_aot.models.nemo_format import extract_tokenizer

# megatron and the model modules that import it (models.aot_model, models.reference) are
# imported where used: the launcher imports this module, and `nemo-aot --help` and config
# validation must not load megatron.

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: str
    final_step: Optional[int]
    """The step training reached; None when the run stopped before training (a signal)."""
    stop_reason: Optional[str]
    nemo_path: Optional[str]
    metrics_path: Optional[str]
    plots: list
    adapter_path: Optional[str] = None
    """A finished LoRA run's adapters in the Hugging Face PEFT layout (rank 0)."""
    signal: Optional[str] = None
    """The signal this rank received (SIGTERM, SIGUSR1, SIGINT), if any: a SIGINT'd run
    saved like a SIGTERM'd one and its command exits 130."""

    @property
    def exit_code(self) -> int:
        from nemo_aot.algorithms.signals import INTERRUPT_EXIT_CODE

        return INTERRUPT_EXIT_CODE if self.signal == "SIGINT" else 0


@dataclasses.dataclass
class RunData:
    """Tokenizer and batches of one run (this rank's share of every global batch)."""

    tokenizer: Any
    tokenizer_dir: str
    train: Any
    val: Any
    """None when data.validation_path is null (no validation)."""
    train_batches: Any
    val_batches: Any
    coverage: Any
    """Every training sample once, in validation order (the reference cache's completion)."""


def policy_tokenizer(run, scratch: str):
    """(tokenizer, its folder): ``data.tokenizer_path`` when set, else the tokenizer stored in
    ``init_from``. A given tokenizer must have the stored one's vocabulary; without a stored
    one, its size must fit the checkpoint's vocabulary up to padding."""
    cfg, stored_dir = run.config, None
    if run.init_from:
        stored_dir = extract_tokenizer(run.init_from, os.path.join(scratch, "init_from_tokenizer"))
    if cfg.data.tokenizer_path is None:
        if stored_dir is None:
            raise ValueError(f"init_from {cfg.init_from} stores no tokenizer; set "
                             "data.tokenizer_path to the policy's Hugging Face tokenizer folder")
        return load_tokenizer(stored_dir), stored_dir
    given_dir = local_or_hub_folder(resolve_path(cfg.data.tokenizer_path), "data.tokenizer_path",
                                    "tokenizer")
    tokenizer = load_tokenizer(given_dir)
    check_tokenizer_fits(
        tokenizer, load_tokenizer(stored_dir) if stored_dir else None, cfg.model.vocab_size,
        option=f"data.tokenizer_path={cfg.data.tokenizer_path}",
        model=f"init_from {cfg.init_from}" if cfg.init_from else "model.vocab_size",
        unset="set data.tokenizer_path=null")
    return tokenizer, given_dir


def build_data(run, scratch: str, dp_rank: int, dp_size: int) -> RunData:
    cfg = run.config
    tokenizer, tokenizer_dir = policy_tokenizer(run, scratch)
    t = cfg.trainer
    train = load_preference_data(cfg.data, "train", tokenizer)
    val = (load_preference_data(cfg.data, "validation", tokenizer)
           if cfg.data.validation_path is not None else None)
    for split in (train, val):  # format=auto: the kind each file's records have
        if split is not None and run.data_kind is None:
            check_data_kind(cfg.alignment.loss_type, split.kind,
                            f"{split.source} ({split.summary.format} records, read with "
                            "data.format=auto)")

    def batches(data, train_order: bool):
        return make_batches(data, cfg.data, t.global_batch_size, t.micro_batch_size,
                            dp_rank, dp_size, train=train_order)

    train_batches = batches(train, True)
    if rank() == 0:
        share = slot_efficiency(train, train_batches.sampler.epoch_steps(0),
                                cfg.data.max_seq_length, cfg.data.pad_to_multiple_of)
        logger.info("train split: real tokens per token slot, epoch 0 on this rank: padded %.1f%%, "
                    "packed %.1f%% (data.pack_sequences=%s)", 100 * share["padded"],
                    100 * share["packed"], str(cfg.data.pack_sequences).lower())
    return RunData(tokenizer, tokenizer_dir, train, val, train_batches,
                   batches(val, False) if val is not None else [],
                   batches(train, False))


def build_reference(run, policy, data: RunData, dp_rank: int, dp_size: int, stop_requested):
    """The reference of ``alignment.reference_policy`` (collective): ``cached`` scores every
    sample once now (or reads a cache of it), ``cpu_swap`` snapshots the policy's weights as they
    are, ``adapters_off`` is the policy without its LoRA adapters. Each attaches reference
    log-probs to a step's micro-batches (``nemo_aot.models.reference``)."""
    from nemo_aot.models.reference import AdaptersOffReference, CachedReference, CpuSwapReference

    a = run.config.alignment
    builders = {
        "cached": lambda: CachedReference(
            _reference_tables(run, policy, data, dp_rank, dp_size, stop_requested),
            a.length_normalize),
        "cpu_swap": lambda: CpuSwapReference(policy, a.length_normalize),
        "adapters_off": lambda: AdaptersOffReference(policy, a.length_normalize),
    }
    return builders[a.reference_policy]()


def _reference_tables(run, policy, data: RunData, dp_rank: int, dp_size: int, stop_requested):
    """Cached reference log-probs per split (scored in step order; see models/reference.py)."""
    from nemo_aot.models.reference import cached_reference, fingerprint

    cfg, model_origin = run.config, policy_origin(run)
    t = cfg.trainer
    epoch0 = make_batches(data.train, cfg.data, t.global_batch_size, t.micro_batch_size,
                          dp_rank, dp_size, train=True)
    splits = {"train": (data.train, epoch0, data.coverage),
              "validation": (data.val, data.val_batches, [])}
    if data.val is None:
        del splits["validation"]
    cache_dir = run.reference_cache_dir
    tables = {}
    for split, (d, ordered, coverage) in splits.items():
        sizes = (tuple(len(s) for s in d.streams) if d.kind == "unpaired"
                 else (len(d.streams[0]),) * 2)
        key = fingerprint(split=split, source=d.source, sizes=sizes, model=model_origin,
                          seq=cfg.data.max_seq_length, mbs=cfg.trainer.micro_batch_size,
                          gbs=cfg.trainer.global_batch_size, seed=cfg.data.seed,
                          tokenizer=cfg.data.tokenizer_path, kind=d.kind)
        path = os.path.join(cache_dir, f"{split}_{key}.pt")
        tables[split] = cached_reference(policy, _epoch_then_rest(ordered, coverage),
                                         sizes, path, total=len(ordered) + len(coverage),
                                         what=f"reference scoring ({split})",
                                         stop_requested=stop_requested)
    return tables


def _epoch_then_rest(ordered, coverage):
    """Score in the order training/validation will see batches (so step 0 sees bitwise the
    policy's own log-probs), then any sample that order does not reach."""
    yield from ordered
    yield from coverage


def build_policy(run):
    """The policy at the run's parallel layout, with init_from's weights when set, and under
    LoRA the adapters of peft.adapter_from when set (collective)."""
    from nemo_aot.models.aot_model import MegatronGPTAOTModel, load_nemo_into

    cfg = run.config
    model = MegatronGPTAOTModel(
        cfg.model, precision=cfg.precision, parallel=cfg.parallel, peft=cfg.peft,
        performance=cfg.performance, logprobs_from=cfg.alignment.logprobs_from,
        logprob_chunk_size=cfg.alignment.logprob_chunk_size,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer, seed=cfg.trainer.seed)
    if run.init_from:
        load_nemo_into(run.init_from, list(model.chunks))
    if cfg.peft.enabled and rank() == 0:
        params = [p for c in model.chunks for p in c.parameters()]
        trained = sum(p.numel() for p in params if p.requires_grad)
        logger.info("LoRA: rank 0 trains %d of its %d parameters (%.2f%%), the base is frozen",
                    trained, sum(p.numel() for p in params),
                    100 * trained / sum(p.numel() for p in params))
    if cfg.peft.enabled and cfg.peft.adapter_from:
        read = load_adapter_from(list(model.chunks), cfg)
        if rank() == 0:
            logger.info("LoRA adapters from %s", read)
    return model


def policy_origin(run) -> str:
    """What the starting policy is made of (the reference cache's model key)."""
    cfg = run.config
    origin = cfg.init_from or f"random-init seed={cfg.trainer.seed} {cfg.model.to_dict()}"
    if cfg.peft.enabled and cfg.peft.adapter_from:
        origin += f" + adapter {cfg.peft.adapter_from}"
    return origin


def setup_run(run) -> tuple[int, int]:
    """Parallel state for the run's layout: (dp_rank, dp_size). The run must be resolved for
    the world that was launched."""
    from megatron.core import parallel_state

    cfg = run.config
    initialize_model_parallel(cfg.parallel, cfg.model, seed=cfg.trainer.seed)
    launched = torch.distributed.get_world_size()
    if run.layout.world_size != launched:
        raise ValueError(f"the run was resolved for {run.layout.world_size} ranks but {launched} "
                         f"were launched: resolve it for the launched world (resolve_run's "
                         "default, as nemo-aot train and launch do)")
    return (parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size())


def run_training(run) -> RunResult:
    """Train the ``ResolvedRun`` (every rank calls it)."""
    cfg = run.config
    started = time.monotonic()  # the time budget includes set-up
    lock = RunLock(run.output_dir)
    with PreemptionHandler(enabled=cfg.checkpoint.save_on_signal) as preemption, \
            tempfile.TemporaryDirectory(prefix="nemo_aot_run_") as scratch:
        try:
            result = _run(run, preemption, started, scratch, lock)
        except StopRequested as stop:
            if rank() == 0:
                logger.warning("%s received during %s: stopping before training; nothing was "
                               "trained or exported, a requeued job starts over from here",
                               preemption.signal_name or "a signal on another rank", stop)
            result = RunResult(cfg.logging.output_dir, None, "signal", None, None, [])
        finally:
            lock.release()
        result.signal = preemption.signal_name
        return result


def _run(run, preemption, started: float, scratch: str, lock: RunLock) -> RunResult:
    """The wiring: parts are built (and stop points agreed) in order, then fit and export."""
    from nemo_aot.algorithms.objective import PreferenceObjective

    cfg = run.config
    dp_rank, dp_size = setup_run(run)
    _take_lock(lock)
    # Which checkpoint to resume, and whether it was trained with this config: decided before
    # anything is built or written (a refused resume leaves the run folder as it was).
    manager = CheckpointManager(run.checkpoint_dir, keep_last=cfg.checkpoint.keep_last)
    latest = manager.latest_valid() if cfg.checkpoint.resume == "auto" else None
    resume_record = _check_resume(run, latest) if latest is not None else None
    no_room = from_rank0(manager.free_space_problem() if rank() == 0 else None)
    if no_room is not None:
        raise ValueError(no_room)
    if rank() == 0:
        write_text(os.path.join(run.output_dir, CONFIG_FILE), run.config_yaml)
    data = build_data(run, scratch, dp_rank, dp_size)
    schedule = run.schedule.for_epoch_length(len(data.train_batches))
    stop_point(preemption.requested, "data loading")
    model = build_policy(run)
    stop_point(preemption.requested, "model set-up")
    reference = build_reference(run, model, data, dp_rank, dp_size, lambda: preemption.requested)
    optimizer, scheduler = build_optimizer(cfg, schedule, model)
    checkpointer = RunCheckpointer(
        manager, model, optimizer, scheduler, data.train_batches, config_text=run.config_yaml,
        config_hash=run.config_hash, tokenizer_dir=data.tokenizer_dir)
    checkpointer.resume_record = resume_record
    reporter = RunReporter(cfg, cfg.model, schedule.total_steps, dp_size,
                           torch.distributed.get_world_size(),
                           resume_step=latest.step if latest is not None else None,
                           enabled=rank() == 0)
    trainer = AOTTrainer(cfg, schedule, policy=model, objective=PreferenceObjective(cfg.alignment),
                         reference=reference, optimizer=optimizer, scheduler=scheduler,
                         train_batches=data.train_batches, val_batches=data.val_batches,
                         save_fn=checkpointer.save, log_fn=reporter.log,
                         validation_hook=reporter.on_validation,
                         signal_received=lambda: preemption.requested, started=started)
    if latest is not None:
        checkpointer.restore(latest, trainer)
        reporter.resumed(latest.path, trainer.state.step)

    if trainer.state.step == 0 and cfg.trainer.val_check_interval and data.val is not None:
        trainer.validate()
    trainer.fit()
    nemo_path = _export(run, model, trainer, data.tokenizer_dir)
    adapter_path = None
    if nemo_path is not None and cfg.peft.enabled:
        model.sync_params()  # the adapters as the last optimizer step left them
        adapter_path = export_adapter(list(model.chunks), cfg,
                                      os.path.join(cfg.logging.output_dir, ADAPTER_DIR),
                                      base_model=cfg.init_from)
    reporter.close()
    return RunResult(run.output_dir, trainer.state.step, trainer.stop_reason,
                     nemo_path if rank() == 0 else None, reporter.metrics_path, reporter.plots,
                     adapter_path if rank() == 0 else None)


def _take_lock(lock: RunLock) -> None:
    """Rank 0 takes the output folder's lock; every rank raises when another run holds it."""
    error = None
    if rank() == 0:
        try:
            lock.acquire()
        except ValueError as err:
            error = str(err)
    error = from_rank0(error)
    if error is not None:
        raise ValueError(error)


def _check_resume(run, latest) -> Optional[dict]:
    """Compare the checkpoint's config with this run's (rank 0 reads, every rank gets the
    same answer): refuse a change beyond the resume-free keys unless
    checkpoint.allow_config_change; record what changed. Returns the record, or None."""
    from nemo_aot.algorithms import resume_check

    cfg = run.config
    changes, error = {}, None
    if rank() == 0 and latest.metadata.get("config_hash") != run.config_hash:
        stored = resume_check.stored_config(latest.path)
        if stored is None:
            changes = {"(unknown: the checkpoint stores no config.yaml)": (None, run.config_hash)}
        else:
            changes = resume_check.config_changes(stored, cfg)
        try:
            resume_check.check_resume(changes, latest.path, cfg.checkpoint.allow_config_change)
        except ValueError as err:
            error = str(err)
    changes, error = from_rank0((changes, error))
    if error is not None:
        raise ValueError(error)
    if not changes:
        return None
    entry = None
    if rank() == 0:
        entry = resume_check.record(run.output_dir, latest.step, latest.path, changes,
                                    cfg.checkpoint.allow_config_change)
        logger.warning("resuming %s with config changes (recorded in %s): %s", latest.path,
                       resume_check.CHANGES_FILE,
                       "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items()))
    return from_rank0(entry)


def _export(run, model, trainer, tokenizer_dir: str) -> Optional[str]:
    """The policy as <output_dir>/aot_policy.nemo when the run finished (collective); under
    LoRA with the adapters merged into the base weights (a plain model)."""
    cfg = run.config
    if not cfg.checkpoint.export_nemo_at_end:
        return None
    if trainer.stop_reason not in COMPLETE_REASONS:
        if rank() == 0:
            logger.warning("stopped by %s at step %d: the policy is in the checkpoint; no .nemo "
                           "exported (a resumed run exports at its end, or use `nemo-aot "
                           "export`)", trainer.stop_reason, trainer.state.step)
        return None
    path = os.path.join(run.output_dir, "aot_policy.nemo")
    model.save_to(path, tokenizer_dir=tokenizer_dir)
    return path
