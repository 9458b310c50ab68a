"""What a run shows: console progress, metrics JSONL/TensorBoard/W&B, throughput and MFU, and
at each validation the chosen-vs-rejected reward CDFs and the FSD violation curve (rank 0)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Optional

from nemo_aot.algorithms.observability import (MetricsLogger, ProgressBar, plot_fsd_violation,
                                               plot_reward_cdfs, throughput)

logger = logging.getLogger(__name__)


class RunObserver:
    def __init__(self, cfg, model_arch, total_steps: int, dp_size: int, world_size: int,
                 resume_step: Optional[int] = None, enabled: bool = True):
        self.cfg, self.model_arch = cfg, model_arch
        self.enabled, self.dp_size, self.world_size = enabled, dp_size, world_size
        out = cfg.logging.output_dir
        self.plot_dir = os.path.join(out, "plots")
        self.logger = MetricsLogger(
            out, tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
            wandb_mode=cfg.logging.wandb_mode, wandb_run_name=cfg.logging.wandb_run_name,
            run_config=dataclasses.asdict(cfg), resume_step=resume_step, enabled=enabled)
        self.metrics_path = self.logger.path if enabled else None
        self.bar = ProgressBar(total_steps, initial_step=resume_step or 0,
                               enabled=enabled and cfg.logging.progress_bar)
        self.plots: list[str] = []
        self._last = time.monotonic()

    def log(self, split: str, step: int, metrics: dict) -> None:
        if not metrics:
            return
        metrics = dict(metrics)
        if split == "train":
            now = time.monotonic()
            tokens = metrics.pop("local_tokens", 0) * self.dp_size
            rate = throughput(tokens, max(now - self._last, 1e-9), self.model_arch,
                              self.world_size, peak_tflops=self.cfg.logging.peak_tflops)
            self._last = now
            metrics.update(tokens_per_s=rate["tokens_per_s"], mfu=rate["mfu"])
            if step % max(self.cfg.trainer.log_every_n_steps, 1) == 0:
                self.logger.log(metrics, step, split)
            self.bar.update(step, metrics)
        else:
            self.logger.log(metrics, step, split)
            self._last = time.monotonic()  # validation time is not training throughput

    def on_validation(self, step: int, metrics: dict, rewards: dict) -> None:
        if not (self.enabled and self.cfg.logging.plot_every_validation):
            return
        if rewards["chosen"].numel() == 0 or rewards["rejected"].numel() == 0:
            return
        try:
            self._plot(step, rewards)
        except Exception as err:  # noqa: BLE001 - a plot must never stop a training run
            logger.warning("plotting at step %d failed: %s", step, err)

    def _plot(self, step: int, rewards: dict) -> None:
        os.makedirs(self.plot_dir, exist_ok=True)
        path = plot_reward_cdfs(rewards["chosen"], rewards["rejected"],
                                os.path.join(self.plot_dir, f"reward_cdf_step{step:06d}.png"),
                                step=step, title="Validation reward CDFs")
        latest = os.path.join(self.plot_dir, "reward_cdf.png")
        shutil.copyfile(path, latest)
        fsd = plot_fsd_violation(self.metrics_path, os.path.join(self.plot_dir, "fsd_violation.png"))
        self.plots = sorted({*self.plots, latest, fsd})

    def resumed(self, path: str, step: int) -> None:
        if self.enabled:
            print(f"resumed from {path} at step {step}", flush=True)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
