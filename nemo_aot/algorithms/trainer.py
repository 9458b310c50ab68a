"""``AOTTrainer``: the preference-training loop, in NeMo-Aligner's shape, over three named
parts - a policy, an objective and a reference.

    for each global batch:
        reference.attach(micro_batches)      reference log-probs as data (a cached table lookup,
                                             a CPU weight swap, the adapters switched off)
        train_single_step:
            policy.prepare_for_training_step()       train mode, zero DDP grad buffers
            objective.step(policy, micro_batches)    forward/backward in megatron's schedule
            optimizer.step()                         grad sync already done; clip; Adam; LR
            policy.finish_training_step()
        non-finite loss or grad norm -> skip the update (counted) or abort, by config
        log; validate every N steps; checkpoint every M steps or on SIGTERM/SIGUSR1; stop on
        the schedule's length (max_steps / max_epochs) or the time budget

The trainer depends only on those interfaces (``nemo_aot.models.aot_model`` for the policy's,
``nemo_aot.algorithms.objective`` and ``nemo_aot.models.reference``), the megatron optimizer and
scheduler, the run's ``Schedule`` and resumable batch iterables.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from nemo_aot.distributed.ranks import any_ranks, is_rank_zero

# megatron and algorithms.objective (which imports it) are imported where used: run.py, and
# through it the launcher and `nemo-aot --help`, import this module and must not load megatron.

logger = logging.getLogger(__name__)

# Stop reasons of a finished run (it exports its policy); any other stop (signal, time budget)
# leaves a checkpoint to resume from.
COMPLETE_REASONS = ("max_steps", "max_epochs")


def build_optimizer(cfg, schedule, model):
    """megatron-core optimizer (optionally distributed) and its LR/WD scheduler over the run's
    real length (``schedule``: a ``resolve.Schedule`` that knows its steps per epoch)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, precision = cfg.optim, cfg.precision.precision
    total = schedule.total_steps
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=cfg.trainer.grad_clip, bf16=precision == "bf16", fp16=precision == "fp16",
        params_dtype=model.transformer_config.params_dtype,
        use_distributed_optimizer=o.use_distributed_optimizer,
        # fp16 only: a dynamic loss scale (bf16 and fp32 need none)
        initial_loss_scale=2.0 ** 16 if precision == "fp16" else None)
    optimizer = get_megatron_optimizer(opt_config, list(model.chunks))
    if use_fused_adam(optimizer, o.fused_adam) and is_rank_zero():
        logger.info("optimizer: torch's fused AdamW kernel (optim.fused_adam=%s)",
                    str(o.fused_adam).lower() if o.fused_adam is not None else "null: GPU")
    gbs = cfg.trainer.global_batch_size
    # megatron counts samples; warmup then decay over the rest of the run
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps * gbs, lr_decay_steps=total * gbs,
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=total * gbs, wd_incr_style="constant")
    model.transformer_config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


def use_fused_adam(optimizer, fused: Optional[bool]) -> list:
    """Switch megatron's torch AdamW fallback to torch's fused kernel (``optim.fused_adam``:
    null = where the parameters it updates are on a CUDA GPU). Returns the param groups
    switched. TE's/apex's FusedAdam are left as they are."""
    switched = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", part)  # megatron's wrappers hold torch's optimizer
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            on_gpu = all(p.is_cuda for p in group["params"])
            if fused or (fused is None and on_gpu and group["params"]):
                group["fused"], group["foreach"] = True, False
                switched.append(group)
    return switched


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs."""

    step: int = 0
    epoch: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "consumed_samples": self.consumed_samples,
                "skipped_steps": self.skipped_steps}


class AOTTrainer:
    """Runs steps, validation and checkpointing; knows nothing about megatron internals."""

    def __init__(self, cfg, schedule, *, policy, objective, reference, optimizer, scheduler,
                 train_batches, val_batches, save_fn: Callable[["AOTTrainer"], None],
                 log_fn: Callable[[str, int, dict], None],
                 validation_hook: Optional[Callable[[int, dict, dict], None]] = None,
                 signal_received: Optional[Callable[[], bool]] = None,
                 started: Optional[float] = None,
                 step_hook: Optional[Callable[["AOTTrainer"], Optional[str]]] = None):
        self.cfg, self.schedule = cfg, schedule
        self.policy, self.objective, self.reference = policy, objective, reference
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_batches, self.val_batches = train_batches, val_batches
        self.save_fn, self.log_fn = save_fn, log_fn
        self.validation_hook = validation_hook
        # This rank's own view: the loop acts on it only after all ranks agree (_stop_reason).
        self.signal_received = signal_received or (lambda: False)
        # After each step (e.g. SFT's snapshots and target check): a stop reason ends the run.
        # Its answer must be the same on every rank (decide on rank 0, broadcast).
        self.step_hook = step_hook
        self.state = TrainState()
        self.max_steps = schedule.total_steps
        # The time budget counts from the start of the run (set-up included), on each rank's
        # clock; the first rank past it stops every rank.
        self.started = time.monotonic() if started is None else started
        self.stop_reason: Optional[str] = None

    # ------------------------------------------------------------------ one step
    def train_single_step(self, micro_batches: list[dict]) -> dict[str, float]:
        self.policy.prepare_for_training_step()
        self.optimizer.zero_grad()
        t0 = time.monotonic()
        metrics = dict(self.objective.step(self.policy, micro_batches, forward_only=False).metrics)
        if self.cfg.model.num_moe_experts is not None:  # their gradients are in the step already
            from nemo_aot.models.router_metrics import router_loss_metrics

            metrics.update(router_loss_metrics(len(micro_batches), self.cfg.model.num_layers))
        loss_finite = math.isfinite(metrics.get("loss", 0.0))
        if loss_finite:
            success, grad_norm, _ = self.optimizer.step()
        else:
            success, grad_norm = False, float("nan")
        grad_finite = grad_norm is None or math.isfinite(grad_norm)
        if not (loss_finite and grad_finite) or not success:
            self.state.skipped_steps += 1
            # the step being taken: state.step counts the steps done before it (logs say +1)
            if self.cfg.trainer.nonfinite == "abort":
                raise FloatingPointError(
                    f"step {self.state.step + 1}: non-finite loss ({metrics.get('loss')}) or grad "
                    f"norm ({grad_norm}); weights were not updated. Lower optim.lr, check the "
                    "data, or set trainer.nonfinite=skip to skip such steps")
            logger.warning("step %d: skipped (loss %s, grad norm %s)", self.state.step + 1,
                           metrics.get("loss"), grad_norm)
        else:
            self.scheduler.step(increment=self.cfg.trainer.global_batch_size)
        self.policy.finish_training_step()
        tokens = sum(int(mb["input_ids"].numel()) for mb in micro_batches)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       lr=self.optimizer.param_groups[0]["lr"], step_time=time.monotonic() - t0,
                       skipped_steps=self.state.skipped_steps, local_tokens=tokens)
        return metrics

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Metrics over the validation split (or its first limit_val_batches global batches),
        reduced exactly: additive pieces summed over every batch, finalized once."""
        from nemo_aot.algorithms.objective import finalize_sums

        totals: dict[str, float] = {}
        chosen, rejected = [], []
        limit = self.cfg.trainer.limit_val_batches
        for i, micro_batches in enumerate(self.val_batches):
            if limit is not None and i >= limit:
                break
            micro_batches = self.reference.attach(micro_batches, split="validation")
            with self.policy.evaluating():
                result = self.objective.step(self.policy, micro_batches, forward_only=True,
                                             collect_rewards=True)
            for k, v in result.sums.items():
                totals[k] = totals.get(k, 0.0) + v
            chosen.append(result.rewards["chosen"])
            rejected.append(result.rewards["rejected"])
        metrics = finalize_sums(totals)
        rewards = {"chosen": torch.cat(chosen) if chosen else torch.zeros(0),
                   "rejected": torch.cat(rejected) if rejected else torch.zeros(0)}
        self.log_fn("validation", self.state.step, metrics)
        if self.validation_hook is not None:
            self.validation_hook(self.state.step, metrics, rewards)
        return metrics

    # ------------------------------------------------------------------ loop
    def _out_of_time(self) -> bool:
        budget = self.cfg.trainer.max_time_minutes
        return budget is not None and time.monotonic() - self.started > 60 * budget

    def fit(self) -> TrainState:
        t = self.cfg.trainer
        max_epochs = self.schedule.max_epochs
        # A resumed run may already be done (e.g. requeued after its last save): train nothing.
        self.stop_reason = self._stop_reason()
        while self.stop_reason is None:
            for micro_batches in self.train_batches:
                micro_batches = self.reference.attach(micro_batches)
                metrics = self.train_single_step(micro_batches)
                self.state.step += 1
                self.state.consumed_samples += t.global_batch_size
                self.log_fn("train", self.state.step, metrics)
                if self._validation_due():
                    self.validate()
                hooked = self.step_hook(self) if self.step_hook is not None else None
                self.stop_reason = self._stop_reason() or hooked
                if self.stop_reason is not None or self._save_due():
                    self.save_fn(self)
                if self.stop_reason is not None:
                    break
            else:
                self.state.epoch += 1
                if max_epochs is not None and self.state.epoch >= max_epochs:
                    self.stop_reason = "max_epochs"
                    self.save_fn(self)
        return self.state

    def _validation_due(self) -> bool:
        interval = self.cfg.trainer.val_check_interval
        # no validation data (data.validation_path=null): nothing to validate
        return bool(interval) and self.state.step % interval == 0 and len(self.val_batches) > 0

    def _save_due(self) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return bool(interval) and self.state.step % interval == 0

    def _stop_reason(self) -> Optional[str]:
        """Why to stop after this step, the same on every rank: signals and the time budget are
        local observations, agreed with one all-reduce; the step count is the same everywhere."""
        signal, out_of_time = any_ranks([self.signal_received(), self._out_of_time()])
        if signal:
            return "signal"
        reached = self.schedule.stop_reason(self.state.step)
        if reached is not None:
            return reached
        if out_of_time:
            return "max_time"
        return None


__all__ = ["AOTTrainer", "TrainState", "build_optimizer", "COMPLETE_REASONS"]
