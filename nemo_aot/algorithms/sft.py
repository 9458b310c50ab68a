"""Supervised fine-tuning (SFT) on nemo_aot's megatron path: the reference policy maker.

    loss = - sum_t loss_mask_t * log pi(labels_t | prefix) / sum_t loss_mask_t

over the response tokens of the chosen (paired data) or positive (unpaired data) rows of each
micro-batch; rejected/negative rows are dropped before the forward. Everything else is the
preference pipeline's own machinery, reused as is:

* the run is a ``ResolvedRun`` (model, data, trainer, optim, precision, parallel, init_from;
  of the alignment section only the log-prob path is read), resolved like any ``nemo-aot train``
  run;
* data come from ``load_preference_data`` + ``make_batches`` (formats, chat template, label
  mask, DP sharding, per-epoch shuffles);
* the policy is a ``MegatronGPTAOTModel`` (megatron-core GPTModel chunks wrapped in megatron
  DDP) with megatron's optimizer and LR schedule from ``build_optimizer``; ``SFTObjective`` is
  the objective part of ``AOTTrainer`` and runs through the policy's own schedule runner, so
  tensor and data parallelism work under torchrun as they do for preference training (pipeline
  parallelism is refused: rows are trimmed per micro-batch);
* the per-token log-probs are the policy's (``PolicyRunner.token_logprobs``, exact at any TP
  size);
* the result is written with ``MegatronGPTAOTModel.save_to`` (``nemo_format.save_nemo``).

Each micro-batch's loss is its own token mean; megatron averages micro-batches and DDP averages
ranks (micro-batches of very different token counts are weighted alike, as in most SFT loops).
Weights only are saved: SFT here makes a small reference policy, it is not a resumable job.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from typing import Callable, Optional

import torch

from nemo_aot.algorithms.run import build_policy, policy_tokenizer, setup_run
from nemo_aot.algorithms.trainer import AOTTrainer, build_optimizer
from nemo_aot.data import load_preference_data, make_batches
from nemo_aot.distributed.parallel import compute_device
from nemo_aot.distributed.ranks import from_rank0, rank

# megatron and algorithms.objective (which imports it) load when a step runs, as in the rest of
# the algorithms package: importing it stays free of megatron.

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SFTResult:
    nemo_path: Optional[str]
    """The final policy (rank 0 only; None on other ranks)."""
    steps: int
    snapshots: list
    """(step, path) of the intermediate .nemo snapshots, in step order."""
    history: list
    """One {step, loss, grad_norm, lr, time} record per optimizer step."""


def select_trained_rows(mb: dict) -> dict:
    """The chosen/positive rows of a collated micro-batch (filler rows dropped)."""
    keep = mb["label"] & (mb["sample_weight"] > 0)
    rows = {k: v[keep] for k, v in mb.items() if torch.is_tensor(v) and v.dim() >= 1
            and v.shape[0] == keep.shape[0]}
    width = int(rows["seq_lengths"].max()) if rows["seq_lengths"].numel() else 1
    # Dropping rows may leave trailing all-padding columns: trim them (the mask is 0 there).
    return {k: (v[:, :width].contiguous() if v.dim() == 2 else v) for k, v in rows.items()}


def response_cross_entropy(policy, output: torch.Tensor, mb: dict) -> torch.Tensor:
    """Token-mean negative log-likelihood of the masked (response) labels, fp32, from the last
    stage's ``output`` (the policy's log-prob path: hidden states or logits)."""
    token_logps = policy.runner.token_logprobs(output, mb["labels"])
    mask = mb["loss_mask"].to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1.0)


def _global_mean(local: list) -> float:
    """Mean over micro-batches and data-parallel ranks, on every rank."""
    from megatron.core import parallel_state

    # On the rank's device: NCCL reduces no host tensors.
    total = torch.tensor([sum(local), float(len(local))], dtype=torch.float64,
                         device=compute_device())
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return float(total[0] / total[1])


class SFTObjective:
    """The NLL objective on the policy (``AOTTrainer``'s objective part): the same loop, stop
    and logging machinery as preference training, and the same schedule runner."""

    data_kinds = ("paired", "unpaired")  # the chosen responses of either kind

    def step(self, policy, micro_batches: list[dict], forward_only: bool = False,
             collect_rewards: bool = False):
        """Forward(/backward) of one global batch; the loss is the mean micro-batch loss over
        all micro-batches and data-parallel ranks, on every rank."""
        from nemo_aot.algorithms.objective import StepResult

        rows = [select_trained_rows(mb) for mb in micro_batches]
        if any(r["input_ids"].shape[0] == 0 for r in rows):
            raise ValueError("a micro-batch holds no chosen/positive rows to train on; use paired "
                             "data or unpaired data with positives in every micro-batch")

        def loss_for(index, mb, output):
            loss = response_cross_entropy(policy, output, mb)
            return loss, {"ce": loss.detach().clone()}

        stats = policy.forward_backward(rows, loss_for, forward_only)
        return StepResult({"loss": _global_mean([float(s["ce"]) for s in stats if "ce" in s])},
                          {})


def build_sft(run, scratch: str):
    """(model, optimizer, scheduler, schedule, training batches, tokenizer folder) of the
    ``ResolvedRun`` at its parallel layout; ``scratch`` holds the tokenizer taken from init_from
    while it is used."""
    cfg = run.config
    if run.layout.pipeline > 1:
        raise ValueError("SFT does not support pipeline parallelism; set "
                         "parallel.pipeline_model_parallel_size=1 (TP and DP work)")
    dp_rank, dp_size = setup_run(run)
    tokenizer, tokenizer_dir = policy_tokenizer(run, scratch)
    data = load_preference_data(cfg.data, "train", tokenizer)
    t = cfg.trainer
    batches = make_batches(data, cfg.data, t.global_batch_size, t.micro_batch_size,
                           dp_rank, dp_size, train=True)
    schedule = run.schedule.for_epoch_length(len(batches))
    model = build_policy(run)
    optimizer, scheduler = build_optimizer(cfg, schedule, model)
    return model, optimizer, scheduler, schedule, batches, tokenizer_dir


def train_sft(run, out_path: str, snapshot_every: int = 0,
              on_step: Optional[Callable[[dict], None]] = None,
              stop_when: Optional[Callable[[int, list], bool]] = None,
              check_every: int = 0) -> SFTResult:
    """Fine-tune the ``ResolvedRun``'s init_from (or a random init of its model) on its data's
    chosen/positive responses for ``trainer.max_steps`` steps (or ``max_epochs``); write
    ``out_path`` and, every ``snapshot_every`` steps, ``<out_path stem>_stepNNNNNN.nemo``.

    ``stop_when(step, chunks)`` runs every ``check_every`` steps on every rank with the model
    chunks in eval mode (e.g. a greedy-accuracy check); rank 0's answer decides, and True ends
    training there. Every rank calls ``train_sft`` (under torchrun, the data are sharded over
    data-parallel ranks). The loop is ``AOTTrainer``'s, with ``SFTObjective`` as the model, no
    validation and no checkpoints; a non-finite loss or gradient norm stops with an error."""
    with tempfile.TemporaryDirectory(prefix="nemo_aot_sft_") as scratch:
        return _train_sft(run, out_path, scratch, snapshot_every, on_step, stop_when, check_every)


def _train_sft(run, out_path, scratch, snapshot_every, on_step, stop_when, check_every):
    from nemo_aot.models.reference import NoReference

    model, optimizer, scheduler, schedule, batches, tokenizer_dir = build_sft(run, scratch)
    # SFT's own loop settings: no validation, a non-finite step stops the run
    cfg = dataclasses.replace(run.config, trainer=dataclasses.replace(
        run.config.trainer, val_check_interval=0, nonfinite="abort"))
    stem = os.path.splitext(out_path)[0]
    history, snapshots, started = [], [], time.monotonic()

    def log(split: str, step: int, metrics: dict) -> None:
        record = {"step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                  "lr": metrics["lr"], "time": time.monotonic() - started}
        history.append(record)
        if on_step is not None and rank() == 0:
            on_step(record)

    def after_step(trainer) -> Optional[str]:
        step = trainer.state.step
        if snapshot_every and step % snapshot_every == 0 and step < trainer.max_steps:
            path = f"{stem}_step{step:06d}.nemo"
            model.save_to(path, tokenizer_dir=tokenizer_dir)
            snapshots.append((step, path))
        if stop_when is not None and check_every and step % check_every == 0:
            with model.evaluating():
                if from_rank0(bool(stop_when(step, list(model.chunks)))):
                    return "target_reached"
        return None

    trainer = AOTTrainer(cfg, schedule, policy=model, objective=SFTObjective(),
                         reference=NoReference(), optimizer=optimizer, scheduler=scheduler,
                         train_batches=batches, val_batches=[], save_fn=lambda trainer: None,
                         log_fn=log, step_hook=after_step, started=started)
    trainer.fit()
    model.save_to(out_path, tokenizer_dir=tokenizer_dir)
    return SFTResult(out_path if rank() == 0 else None, trainer.state.step, snapshots, history)


__all__ = ["SFTResult", "SFTObjective", "build_sft", "train_sft", "response_cross_entropy",
           "select_trained_rows"]
