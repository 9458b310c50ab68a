"""Preemption at every phase of a run, through the launcher the sbatch script runs (2 ranks):
a signal that reaches one rank during data loading, reference scoring or training stops every
rank at the same point, exits 0 with a status file saying the run is not complete (so
scripts/slurm/train_aot.sbatch requeues it) and without exporting; the requeued job resumes
and finishes."""

import os
import signal

import pytest
import torch

from conftest import history, train_args
from multirank import run_multirank

TIMEOUT = 300


def _signal_self(sig=signal.SIGUSR1):
    os.kill(os.getpid(), sig)


def _inject(phase: str) -> None:
    """Deliver a signal to one rank only, in the middle of ``phase``."""
    rank = torch.distributed.get_rank()
    if phase == "data loading" and rank == 1:
        from nemo_aot.algorithms import run  # where the run looks the loader up

        load = run.load_preference_data

        def load_then_signal(config, split, tokenizer=None):
            data = load(config, split, tokenizer)
            if split == "train":
                _signal_self()
            return data

        run.load_preference_data = load_then_signal
    elif phase == "reference scoring" and rank == 0:
        from nemo_aot.models.policy_runner import PolicyRunner

        score, calls = PolicyRunner.score, []

        def score_then_signal(self, micro_batches, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                _signal_self()
            return score(self, micro_batches, *args, **kwargs)

        PolicyRunner.score = score_then_signal
    elif phase == "training" and rank == 1:
        from nemo_aot.algorithms.trainer import AOTTrainer

        step = AOTTrainer.train_single_step

        def step_then_signal(self, micro_batches):
            metrics = step(self, micro_batches)
            if self.state.step == 2:  # during the third step
                _signal_self(signal.SIGTERM)
            return metrics

        AOTTrainer.train_single_step = step_then_signal


def _launch(args, status, phase):
    from nemo_aot import launcher

    if phase:
        _inject(phase)
    code = launcher.main(["--status-file", status, "--", "train", *args])
    return code


def _status(path):
    with open(path) as f:
        return dict(line.split("=", 1) for line in f.read().splitlines())


# Multi-minute (a signal in every phase, each followed by a requeue): make test-slow.
@pytest.mark.slow
def test_signals_in_every_phase_then_requeues_finish(small_data, init_nemo, tmp_path):
    out = tmp_path / "run"
    status = str(tmp_path / "launch_status.txt")
    args = train_args(small_data, out, f"init_from={init_nemo}")
    cache = out / "reference_cache"

    for phase in ("data loading", "reference scoring"):
        assert run_multirank(_launch, 2, (args, status, phase), timeout=TIMEOUT) == [0, 0]
        assert _status(status)["stop_reason"] == "signal", phase
        assert _status(status)["complete"] == "false" and _status(status)["step"] == ""
        assert not (out / "aot_policy.nemo").exists()
        assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")
        assert not cache.exists() or not os.listdir(cache)  # an interrupted pass writes nothing

    assert run_multirank(_launch, 2, (args, status, "training"), timeout=TIMEOUT) == [0, 0]
    assert _status(status) == {"stop_reason": "signal", "step": "3", "complete": "false",
                               "job_id": ""}
    assert [r["step"] for r in history(out)] == [1, 2, 3]
    assert os.path.isdir(out / "checkpoints" / "step_00000003")
    assert not (out / "aot_policy.nemo").exists()  # no export in the grace period

    assert run_multirank(_launch, 2, (args, status, None), timeout=TIMEOUT) == [0, 0]
    assert _status(status)["stop_reason"] == "max_steps" and _status(status)["complete"] == "true"
    assert [r["step"] for r in history(out)] == list(range(1, 9))
    assert (out / "aot_policy.nemo").exists()
