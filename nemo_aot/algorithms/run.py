"""Wire a validated ``AOTConfig`` into a training run: parallel state, data, model, reference,
optimizer, checkpoints, logging; then fit, and export the policy as a ``.nemo``.

Every rank runs ``run_training``; rank 0 alone writes logs, plots and the final export.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import torch

from nemo_aot.algorithms.checkpointing import CheckpointManager, sharded_rng_state
from nemo_aot.algorithms.config import config_hash, to_yaml
from nemo_aot.algorithms.export import CONFIG_FILE
from nemo_aot.algorithms.trainer import AOTTrainer, build_optimizer, total_steps

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunResult:
    output_dir: str
    final_step: int
    stop_reason: Optional[str]
    nemo_path: Optional[str]
    metrics_path: Optional[str]
    plots: list


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _architecture(cfg):
    """The model architecture: from ``init_from``'s .nemo when set, else ``cfg.model``."""
    if not cfg.init_from:
        return cfg.model
    from nemo_aot.models.nemo_format import read_nemo_config

    model_cfg, _ = read_nemo_config(cfg.init_from)
    return model_cfg


def _load_data(cfg, dp_rank, dp_size):
    from nemo_aot.data import load_preference_data, load_tokenizer, make_batches

    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    t = cfg.trainer
    train = load_preference_data(cfg.data, "train", tokenizer)
    val = load_preference_data(cfg.data, "validation", tokenizer)
    train_batches = make_batches(train, cfg.data, t.global_batch_size, t.micro_batch_size,
                                 dp_rank, dp_size, train=True)
    val_batches = make_batches(val, cfg.data, t.global_batch_size, t.micro_batch_size,
                               dp_rank, dp_size, train=False)
    coverage = make_batches(train, cfg.data, t.global_batch_size, t.micro_batch_size,
                            dp_rank, dp_size, train=False)
    return tokenizer, train, val, train_batches, val_batches, coverage


def _reference_tables(cfg, model, data, model_origin: str):
    """Cached reference log-probs per split (scored in step order; see models/reference.py)."""
    from nemo_aot.models.reference import cached_reference, fingerprint

    cache_dir = cfg.alignment.reference_cache_dir or os.path.join(cfg.logging.output_dir,
                                                                  "reference_cache")
    tables = {}
    for split, (d, ordered, coverage) in data.items():
        sizes = tuple(len(s) for s in d.streams) if d.kind == "unpaired" else (len(d.streams[0]),) * 2
        key = fingerprint(split=split, source=d.source, sizes=sizes, model=model_origin,
                          seq=cfg.data.max_seq_length, mbs=cfg.trainer.micro_batch_size,
                          gbs=cfg.trainer.global_batch_size, seed=cfg.data.seed,
                          tokenizer=cfg.data.tokenizer_path, kind=d.kind)
        path = os.path.join(cache_dir, f"{split}_{key}.pt")
        tables[split] = cached_reference(model.step_runner, _epoch_then_rest(ordered, coverage),
                                         sizes, path)
    return tables


def _epoch_then_rest(ordered, coverage):
    """Score in the order training/validation will see batches (so step 0 sees bitwise the
    policy's own log-probs), then any sample that order does not reach."""
    yield from ordered
    yield from coverage


def run_training(cfg) -> RunResult:
    from megatron.core import dist_checkpointing, parallel_state

    from nemo_aot.algorithms.observer import RunObserver
    from nemo_aot.algorithms.signals import PreemptionHandler
    from nemo_aot.distributed.parallel import initialize_model_parallel
    from nemo_aot.models.aot_model import MegatronGPTAOTModel, model_cfg_node

    if cfg.init_from:
        from nemo_aot.data.tokenization import resolve_path

        cfg = dataclasses.replace(cfg, init_from=resolve_path(cfg.init_from))  # bundled: paths
        if not os.path.isfile(cfg.init_from):
            raise ValueError(f"init_from: {cfg.init_from} is not a file; point it at a .nemo "
                             "(convert Hugging Face checkpoints with `nemo-aot convert hf-to-nemo`)")
    model_arch = _architecture(cfg)
    if cfg.init_from and model_arch != cfg.model:
        # The checkpoint defines the architecture; re-validate the run against it.
        logger.info("init_from %s: using its architecture instead of the model section",
                    cfg.init_from)
        cfg = dataclasses.replace(cfg, model=model_arch)
    initialize_model_parallel(cfg.parallel, model_arch, seed=cfg.trainer.seed)
    resolved = to_yaml(cfg)
    if _rank() == 0:
        _write_text(os.path.join(cfg.logging.output_dir, CONFIG_FILE), resolved)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    cfg.validate(torch.distributed.get_world_size())
    tokenizer, train, val, train_batches, val_batches, coverage = _load_data(cfg, dp_rank, dp_size)
    if len(tokenizer) > model_arch.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                         f"{model_arch.vocab_size}; use the model's own tokenizer")
    model = MegatronGPTAOTModel(
        model_cfg_node(model_arch, cfg.precision, cfg.parallel, cfg.alignment),
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
    if cfg.init_from:
        from nemo_aot.models.aot_model import load_nemo_into

        load_nemo_into(cfg.init_from, list(model.chunks))
    origin = cfg.init_from or f"random-init seed={cfg.trainer.seed} {model_arch.to_dict()}"

    if cfg.alignment.reference_policy == "cached":
        from nemo_aot.data import make_batches

        t = cfg.trainer
        epoch0 = make_batches(train, cfg.data, t.global_batch_size, t.micro_batch_size,
                              dp_rank, dp_size, train=True)
        model.reference_tables = _reference_tables(
            cfg, model, {"train": (train, epoch0, coverage), "validation": (val, val_batches, [])},
            origin)
    else:
        model.enable_cpu_swap()

    optimizer, scheduler = build_optimizer(cfg, model)
    ckpt_root = cfg.checkpoint.dir or os.path.join(cfg.logging.output_dir, "checkpoints")
    manager = CheckpointManager(ckpt_root, keep_last=cfg.checkpoint.keep_last)
    latest = manager.latest_valid() if cfg.checkpoint.resume == "auto" else None

    def state_template(is_loading: bool):
        model_sd = model.sharded_state_dict()
        return {"model": model_sd,
                # megatron-LM's default layout for distributed-optimizer state (resume at the same
                # DP size; other optimizers ignore it)
                "optimizer": optimizer.sharded_state_dict(
                    model_sd, is_loading=is_loading,
                    metadata={"distrib_optim_sharding_type": "dp_reshardable"}),
                "rng": sharded_rng_state()}

    def save(trainer: AOTTrainer) -> None:
        common = {"scheduler": scheduler.state_dict(), "train": trainer.state.to_dict(),
                  "sampler": train_batches.state_dict()}

        def write(tmp_dir: str) -> None:
            state = state_template(is_loading=False)
            state["common"] = common
            dist_checkpointing.save(state, tmp_dir)
            if _rank() == 0:  # self-describing: `nemo-aot export` rebuilds the model from it
                _write_text(os.path.join(tmp_dir, CONFIG_FILE), resolved)

        manager.save(trainer.state.step, write,
                     metadata={**trainer.state.to_dict(), "config_hash": config_hash(cfg)})

    observer = RunObserver(cfg, model_arch, total_steps(cfg, len(train_batches)), dp_size,
                           torch.distributed.get_world_size(),
                           resume_step=latest.step if latest is not None else None,
                           enabled=_rank() == 0)
    trainer = AOTTrainer(cfg, model, optimizer, scheduler, train_batches, val_batches,
                         save_fn=save, log_fn=observer.log,
                         validation_hook=observer.on_validation)
    if latest is not None:
        from nemo_aot.algorithms.checkpointing import restore_rng_state

        state = dist_checkpointing.load(state_template(is_loading=True), latest.path)
        model.load_sharded_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        scheduler.load_state_dict(state["common"]["scheduler"])
        train_batches.load_state_dict(state["common"]["sampler"])
        for k, v in state["common"]["train"].items():
            setattr(trainer.state, k, v)
        observer.resumed(latest.path, trainer.state.step)

    with PreemptionHandler(enabled=cfg.checkpoint.save_on_signal) as preemption:
        trainer.should_stop = preemption.should_stop
        if trainer.state.step == 0 and cfg.trainer.val_check_interval:
            trainer.validate()
        trainer.fit()
    nemo_path = None
    if cfg.checkpoint.export_nemo_at_end:
        nemo_path = os.path.join(cfg.logging.output_dir, "aot_policy.nemo")
        model.save_to(nemo_path, tokenizer_dir=cfg.data.tokenizer_path)
    observer.close()
    return RunResult(cfg.logging.output_dir, trainer.state.step, trainer.stop_reason,
                     nemo_path if _rank() == 0 else None, observer.metrics_path, observer.plots)
