"""Metrics JSONL/TensorBoard, resume truncation, the rank-0 progress bar, PNG plots, and the
FLOP/MFU arithmetic."""

import io
import json
import math
import os

import numpy as np
import pytest
import torch

from nemo_aot.algorithms.reporting import (
    MetricsLogger,
    ProgressBar,
    flops_per_token,
    matmul_params,
    peak_tflops_for,
    plot_fsd_violation,
    plot_reward_cdfs,
    read_history,
    throughput,
)
from nemo_aot.models.config import GPTModelConfig, default_tiny

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_jsonl_records_are_flushed_and_typed(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=False, enabled=True)
    logger.log({"loss": torch.tensor(0.5), "rewards/margins": np.float32(0.25),
                "rewards/accuracies": float("nan"), "lr": 1e-3}, step=1)
    logger.log({"loss": 0.4, "fsd_violation": 0.1}, step=2, split="validation")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # readable before close
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == 0.5
    assert first["rewards/margins"] == 0.25 and first["rewards/accuracies"] is None
    assert first["lr"] == 1e-3
    assert isinstance(first["time"], float)
    logger.close()
    assert [r["step"] for r in read_history(str(tmp_path), split="validation")] == [2]
    assert len(read_history(str(tmp_path / "metrics.jsonl"))) == 2


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, enabled=True) as logger:
        for step in range(1, 6):
            logger.log({"loss": 1.0 / step}, step=step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # a line cut by a kill -9
    assert [r["step"] for r in read_history(str(tmp_path))] == [1, 2, 3, 4, 5]
    with MetricsLogger(str(tmp_path), tensorboard=False, resume_step=3, enabled=True) as logger:
        logger.log({"loss": 0.25}, step=4)
    assert [(r["step"], r["loss"]) for r in read_history(str(tmp_path))] == \
        [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.25)]
    with MetricsLogger(str(tmp_path), tensorboard=False, enabled=True) as logger:  # a fresh run
        logger.log({"loss": 9.0}, step=1)
    assert [r["loss"] for r in read_history(str(tmp_path))] == [9.0]
    assert os.path.exists(tmp_path / "metrics.jsonl.prev")


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(str(tmp_path), tensorboard=True, enabled=True) as logger:
        logger.log({"loss": 0.7, "fsd_violation": float("inf")}, step=3)
        logger.log({"loss": 0.6}, step=4, split="validation")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "validation/loss"]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(3, 0.7)]


def test_wandb_is_optional(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, wandb_project="p", wandb_mode="disabled",
                       enabled=True) as logger:
        logger.log({"loss": 1.0}, step=1)
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install wandb"):
            MetricsLogger(str(tmp_path), tensorboard=False, wandb_project="p", enabled=True)


def test_non_zero_rank_writes_and_prints_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with MetricsLogger(str(tmp_path / "out"), enabled=None) as logger:
        logger.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "out").exists()
    stream = io.StringIO()
    bar = ProgressBar(10, file=stream)
    bar.update(1, {"loss": 1.0})
    bar.close()
    assert not bar.enabled and stream.getvalue() == ""


def test_progress_bar_shows_the_run_on_rank_zero(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    stream = io.StringIO()
    bar = ProgressBar(20, initial_step=5, file=stream)
    bar.update(6, {"loss": 0.69, "rewards/margins": 0.01, "rewards/accuracies": 0.75,
                   "fsd_violation": 0.2, "tokens_per_s": 1234.5, "lr": 1e-3})
    bar.close()
    text = stream.getvalue()
    for field in ("6/20", "loss=0.69", "margin=0.01", "acc=0.75", "fsd=0.2", "tok/s=1234"):
        assert field in text, (field, text)
    assert "lr" not in text
    assert not ProgressBar(20, enabled=False, file=stream).enabled


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE and os.path.getsize(path) > 2000


def test_reward_cdf_plot(tmp_path):
    chosen = torch.randn(200) + 1.0
    rejected = np.random.default_rng(0).normal(size=150)
    path = plot_reward_cdfs(chosen, rejected, str(tmp_path / "plots" / "cdf.png"), step=7)
    assert _is_png(path) and sorted(os.listdir(tmp_path / "plots")) == ["cdf.png"]
    with pytest.raises(ValueError, match="rejected"):
        plot_reward_cdfs(chosen, [], str(tmp_path / "empty.png"))


def test_fsd_violation_plot_from_history(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False, enabled=True) as logger:
        for step in range(1, 11):
            logger.log({"loss": 1.0, "fsd_violation": 1.0 / step}, step=step)
            if step % 5 == 0:
                logger.log({"fsd_violation": 0.5 / step}, step=step, split="validation")
    assert _is_png(plot_fsd_violation(str(tmp_path / "metrics.jsonl"), str(tmp_path / "fsd.png")))
    with pytest.raises(ValueError, match="fsd_violation"):
        plot_fsd_violation([{"step": 1, "loss": 1.0}], str(tmp_path / "none.png"))


def test_flop_count_matches_llama3_8b_parameter_count():
    llama3_8b = GPTModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                               num_attention_heads=32, num_query_groups=8, vocab_size=128256)
    embedding, norms = 128256 * 4096, (2 * 32 + 1) * 4096
    assert matmul_params(llama3_8b) + embedding + norms == 8_030_261_248  # the published count


def test_throughput_and_mfu():
    tiny = default_tiny()  # h 64, 4 query heads of 16, 2 KV heads, f 176, 2 layers, V 512
    n = 2 * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 176) + 64 * 512
    assert matmul_params(tiny) == n == 124928
    assert flops_per_token(tiny) == 6 * n
    assert flops_per_token(tiny, seq_length=100, training=False) == 2 * n + 4 * 2 * 4 * 16 * 100
    stats = throughput(1000, 2.0, tiny, world_size=1, device_name="cpu")
    assert stats["tokens_per_s"] == 500.0 and stats["mfu"] is None
    expected = (1000 * 6 * n + 500 * 2 * n) / 2.0 / 4 / 1e12
    stats = throughput(1000, 2.0, tiny, world_size=4, forward_only_tokens=500, peak_tflops=1.0)
    assert math.isclose(stats["tflops_per_device"], expected)
    assert math.isclose(stats["mfu"], expected)
    assert stats["tokens_per_s_per_device"] == 125.0
    h100 = throughput(1000, 2.0, tiny, world_size=1, device_name="NVIDIA H100 80GB HBM3")
    assert math.isclose(h100["mfu"], h100["tflops_per_device"] / 989.0)
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Some CPU") is None
    with pytest.raises(ValueError, match="seconds"):
        throughput(1, 0.0, tiny, world_size=1)
