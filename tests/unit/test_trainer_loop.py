"""AOTTrainer's control flow with a stand-in model and optimizer: non-finite steps, stop
conditions, validation and checkpoint cadence."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from nemo_aot.algorithms.config import AOTConfig
from nemo_aot.algorithms.objective import StepResult
from nemo_aot.algorithms.resolve import Schedule
from nemo_aot.algorithms.trainer import AOTTrainer


class Batches(list):
    def state_dict(self):
        return {}


class FakePolicy:
    def __init__(self):
        self.finished = 0
        self.evaluating = contextlib.nullcontext

    def prepare_for_training_step(self):
        pass

    def finish_training_step(self):
        self.finished += 1


class FakeObjective:
    def __init__(self, losses):
        self.losses = iter(losses)

    def step(self, policy, mbs, forward_only=False, collect_rewards=False):
        if forward_only:
            rewards = {"chosen": torch.zeros(1), "rejected": torch.zeros(1)}
            return StepResult({"loss": 0.5}, {}, rewards if collect_rewards else None)
        return StepResult({"loss": next(self.losses)}, {})


class NoReference:
    def attach(self, mbs, split="train"):
        return mbs


class FakeOptimizer:
    def __init__(self, norms):
        self.norms = iter(norms)
        self.param_groups = [{"lr": 0.1}]
        self.steps = 0

    def zero_grad(self):
        pass

    def step(self):
        norm = next(self.norms)
        ok = math.isfinite(norm)
        self.steps += int(ok)
        return ok, norm, None


def _trainer(losses, norms, n_batches=4, **trainer_kw):
    cfg = AOTConfig()
    for k, v in trainer_kw.items():
        setattr(cfg.trainer, k, v)
    cfg.checkpoint.save_interval = 2
    cfg.optim.warmup_steps = 1
    saves, logs = [], []
    batch = [{"input_ids": torch.zeros(2, 3, dtype=torch.long)}]
    t = cfg.trainer
    schedule = Schedule(t.max_steps, t.max_epochs, cfg.optim.warmup_steps, t.global_batch_size,
                        t.micro_batch_size).for_epoch_length(n_batches)
    trainer = AOTTrainer(cfg, schedule, policy=FakePolicy(), objective=FakeObjective(losses),
                         reference=NoReference(), optimizer=FakeOptimizer(norms),
                         scheduler=SimpleNamespace(step=lambda increment: None),
                         train_batches=Batches([batch] * n_batches), val_batches=Batches([batch]),
                         save_fn=lambda t: saves.append(t.state.step),
                         log_fn=lambda split, step, m: logs.append((split, step, dict(m))))
    return trainer, saves, logs


def test_nonfinite_loss_or_grad_norm_is_skipped_and_counted():
    # step 2: NaN loss (the optimizer is not called); step 3: an infinite grad norm
    trainer, _, logs = _trainer([0.7, float("nan"), 0.6, 0.5], [1.0, float("inf"), 1.0],
                                max_steps=4, val_check_interval=0)
    trainer.fit()
    assert trainer.optimizer.steps == 2  # the NaN loss never reached the optimizer
    assert trainer.state.skipped_steps == 2
    assert [m["skipped_steps"] for s, _, m in logs if s == "train"] == [0, 1, 2, 2]


def test_skip_warning_names_the_step_the_metrics_log_names(caplog):
    # the NaN loss is the 2nd step: metrics.jsonl records it as step 2, the warning must too
    trainer, _, logs = _trainer([0.7, float("nan"), 0.6], [1.0, 1.0], max_steps=3,
                                val_check_interval=0)
    with caplog.at_level("WARNING", logger="nemo_aot.algorithms.trainer"):
        trainer.fit()
    skipped = [step for s, step, m in logs if s == "train" and math.isnan(m["loss"])]
    assert skipped == [2]
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 2"]


def test_nonfinite_abort_raises_with_advice():
    trainer, _, _ = _trainer([0.7, float("nan")], [1.0, 1.0], max_steps=4, nonfinite="abort",
                             val_check_interval=0)
    with pytest.raises(FloatingPointError, match="^step 2: .*trainer.nonfinite=skip"):
        trainer.fit()
    assert trainer.optimizer.steps == 1


def test_stops_at_first_of_max_steps_and_max_epochs_and_saves_on_cadence():
    trainer, saves, logs = _trainer([0.5] * 20, [1.0] * 20, n_batches=3, max_steps=20,
                                    max_epochs=2, val_check_interval=2)
    trainer.fit()
    assert trainer.state.step == 6 and trainer.stop_reason == "max_epochs"
    assert saves == [2, 4, 6, 6] or saves == [2, 4, 6]
    assert [step for split, step, _ in logs if split == "validation"] == [2, 4, 6]
    assert trainer.schedule.total_steps == 6


def test_signal_stops_after_the_current_step_and_saves():
    trainer, saves, _ = _trainer([0.5] * 10, [1.0] * 10, max_steps=10, val_check_interval=0)
    trainer.signal_received = lambda: trainer.state.step >= 3
    trainer.fit()
    assert trainer.state.step == 3 and trainer.stop_reason == "signal" and saves[-1] == 3


def test_the_schedule_spans_the_real_run_and_needs_decay_steps():
    """An epoch-limited run's schedule length is its epochs' steps (it used to be 0 without
    max_steps, which megatron's scheduler rejects with a bare AssertionError)."""
    schedule = Schedule(max_steps=None, max_epochs=1, warmup_steps=10, global_batch_size=32,
                        micro_batch_size=4)
    assert schedule.total_steps is None  # waits for the data
    assert schedule.for_epoch_length(75).total_steps == 75
    with pytest.raises(ValueError, match=r"optim.warmup_steps=10 is not smaller than the run: "
                                         r"the run is 8 optimizer steps long \(trainer.max_epochs=1"
                                         r" x 8 steps per epoch"):
        schedule.for_epoch_length(8)
    with pytest.raises(ValueError, match=r"0 optimizer steps long.*lower trainer.global_batch"):
        schedule.for_epoch_length(0)
    # max_steps alone: checked at resolution, before any data are read
    with pytest.raises(ValueError, match=r"optim.warmup_steps=10 is not smaller than the run: "
                                         r"the run is 10 optimizer steps long \(trainer.max_steps"):
        Schedule(10, None, 10, 32, 4).checked()
    assert Schedule(20, 2, 1, 32, 4).for_epoch_length(3).stop_reason(6) == "max_epochs"
    assert Schedule(5, 2, 1, 32, 4).for_epoch_length(3).stop_reason(5) == "max_steps"
