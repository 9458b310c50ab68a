"""What a run reports: metrics files, TensorBoard/W&B, a console bar, plots, tokens/s and MFU.

Everything here writes on rank 0 only (other ranks get no-op objects), so the loop may call it
unconditionally after reducing its metrics.

* ``RunReporter``: the one object a training run talks to (``log``, ``on_validation``,
  ``resumed``, ``close``); it wires the pieces below from the run's config: metrics, the bar,
  tokens/s and MFU of every logged training step, and at each validation the chosen-vs-rejected
  reward CDFs and the FSD violation curve.
* ``MetricsLogger``: one JSON object per line in ``<output_dir>/metrics.jsonl`` (``step``,
  ``split``, ``time``, then the metrics; non-finite values are written as null), flushed per
  line; TensorBoard scalars ``<split>/<name>`` under ``<output_dir>/tensorboard``; optionally
  Weights & Biases. W&B is optional: ``pip install wandb``; ``wandb_mode=offline`` writes under
  ``<output_dir>/wandb`` with no network (upload later with ``wandb sync <dir>``). On resume,
  records after the checkpoint's step are dropped (JSONL) or purged (TensorBoard), so curves
  from a resumed run equal an uninterrupted one.
* ``ProgressBar``: tqdm with loss, reward margin, accuracy, FSD violation, tok/s and ETA.
* ``plot_reward_cdfs`` / ``plot_fsd_violation``: PNGs via matplotlib's Agg canvas (no display,
  no global backend switch). AOT asks the chosen-reward CDF to lie right of (below) the
  rejected one at every level: first-order stochastic dominance.
* ``throughput``: model FLOPs per token for a Llama-style decoder (no recompute counted)::

      N      = L * [h * (n_q + 2 n_kv) d + n_q d h + 3 h f] + h V     (matmul weights)
      train  = 6 N + 12 L n_q d s      forward + backward (PaLM's formula, no causal discount)
      fwd    = 2 N +  4 L n_q d s      no-grad passes: cached reference scoring, global sort scope

  with L layers, width h, n_q query / n_kv key-value heads of size d, SwiGLU width f, vocabulary
  V and attention span s (mean tokens attended per token: sum(len^2)/sum(len) over sequences;
  omitted when unknown, which makes the figure a lower bound). MFU = achieved FLOP/s divided by
  world_size x per-device peak dense bf16 FLOP/s (``logging.peak_tflops`` or the table below);
  null on CPU or an unknown device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from nemo_aot.distributed.ranks import is_rank_zero

# matplotlib, TensorBoard and wandb are imported where used: they cost start-up (matplotlib
# ~0.7 s, also for `nemo-aot --help`) and serve outputs a run may switch off (wandb optional).

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per device; the first matching pattern wins.
PEAK_BF16_TFLOPS = (
    (r"H100.*PCIE", 756.0), (r"H100.*NVL", 835.0), (r"GH200", 989.0), (r"H200", 989.0),
    (r"H100", 989.0), (r"H800", 989.0), (r"A100", 312.0), (r"A800", 312.0), (r"L40S", 362.0),
    (r"B200", 2250.0),
)
# Progress-bar fields: metric name -> short label.
BAR_FIELDS = (("loss", "loss"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc"),
              ("fsd_violation", "fsd"), ("tokens_per_s", "tok/s"))


def _scalar(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value.item() if hasattr(value, "item") else value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------- metrics


class MetricsLogger:
    """Rank-0 metrics sink: JSONL (always), TensorBoard and W&B (by config)."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, wandb_mode: str = "offline",
                 wandb_run_name: Optional[str] = None, run_config: Optional[dict] = None,
                 resume_step: Optional[int] = None, enabled: Optional[bool] = None):
        """``resume_step``: the step of the checkpoint a run resumes from (records after it are
        dropped); None starts a new history (an existing metrics file is kept as .prev)."""
        self.enabled = is_rank_zero() if enabled is None else enabled
        self.path = os.path.join(output_dir, METRICS_FILE)
        self._file = self._tb = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if resume_step is None and os.path.exists(self.path):
            os.replace(self.path, self.path + ".prev")
        elif resume_step is not None:
            truncate_history(self.path, resume_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                     purge_step=None if resume_step is None else resume_step + 1)
        if wandb_project and wandb_mode != "disabled":
            self._wandb = _start_wandb(output_dir, wandb_project, wandb_mode, wandb_run_name,
                                       run_config, resume=resume_step is not None)

    def log(self, metrics: Mapping[str, Any], step: int, split: str = "train") -> None:
        """Record ``metrics`` (floats, 0-d tensors, numpy scalars) at optimizer step ``step``."""
        if not self.enabled:
            return
        values = {name: _scalar(value) for name, value in metrics.items()}
        record = {"step": int(step), "split": split, "time": time.time(), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if value is not None:
                    self._tb.add_scalar(f"{split}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items() if v is not None},
                            step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file = self._tb = self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_wandb(output_dir, project, mode, name, run_config, resume):
    try:
        import wandb
    except ImportError:
        raise ValueError("logging.wandb_project is set but the wandb package is not installed; "
                         "pip install wandb, or set logging.wandb_project=null") from None
    # A run id kept in the output folder, so a resumed job continues the same W&B run.
    id_file = os.path.join(output_dir, "wandb_run_id")
    if resume and os.path.exists(id_file):
        run_id = open(id_file).read().strip()
    else:
        run_id = wandb.util.generate_id()
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(project=project, name=name, mode=mode, dir=output_dir, id=run_id,
                      resume="allow", config=run_config)


def read_history(path: str, split: Optional[str] = None) -> list[dict]:
    """Records of a metrics JSONL (a folder means its metrics.jsonl), optionally one split."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):  # only the last line can be cut short (by a kill -9)
                raise ValueError(f"{path}: line {number} is not valid JSON") from None
    return [r for r in records if split is None or r.get("split") == split]


def truncate_history(path: str, last_step: int) -> None:
    """Drop records after ``last_step`` (and a line cut short by a kill), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= last_step:
                kept.append(json.dumps(record) + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------- console


class ProgressBar:
    """A tqdm bar over optimizer steps (rank 0 only; elsewhere every call is a no-op)."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 desc: str = "AOT", file=None):
        self.enabled = enabled and is_rank_zero()
        self._bar = None
        if self.enabled:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, unit="step",
                             dynamic_ncols=True, file=file or sys.stderr)

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Move the bar to ``step`` and show the fields of BAR_FIELDS found in ``metrics``."""
        if self._bar is None:
            return
        shown = {}
        for name, label in BAR_FIELDS:
            if name in metrics and (value := _scalar(metrics[name])) is not None:
                shown[label] = f"{value:.0f}" if name == "tokens_per_s" else f"{value:.4g}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------- plots


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial.png"
    figure.savefig(partial, bbox_inches="tight")
    os.replace(partial, path)  # readers (and a kill) never see half a PNG
    return path


def _as_array(values: Any, name: str):
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    array = array[np.isfinite(array)]
    if array.size == 0:
        raise ValueError(f"{name}: no finite rewards to plot")
    return np.sort(array)


def plot_reward_cdfs(chosen: Any, rejected: Any, path: str, *, step: Optional[int] = None,
                     title: str = "Reward distributions") -> str:
    """Empirical CDFs of per-sample chosen and rejected rewards (arrays/tensors) as a PNG."""
    figure = _figure()
    axes = figure.add_subplot()
    for values, label, color in ((_as_array(chosen, "chosen"), "chosen", "tab:blue"),
                                 (_as_array(rejected, "rejected"), "rejected", "tab:red")):
        levels = np.arange(1, values.size + 1) / values.size
        axes.step(np.concatenate([[values[0]], values]), np.concatenate([[0.0], levels]),
                  where="post", color=color,
                  label=f"{label} (n={values.size}, mean={values.mean():.3g})")
    axes.axvline(0.0, color="gray", linewidth=0.8, linestyle=":")
    axes.set_xlabel("reward = beta * log(pi / pi_ref)")
    axes.set_ylabel("empirical CDF")
    axes.set_ylim(0.0, 1.0)
    axes.set_title(title if step is None else f"{title} (step {step})")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_fsd_violation(history: Union[str, Sequence[Mapping[str, Any]]], path: str, *,
                       key: str = "fsd_violation") -> str:
    """``key`` over steps, one line per split, from a metrics JSONL (path) or its records."""
    records = read_history(history) if isinstance(history, str) else list(history)
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.get(key) is not None:
            series.setdefault(record.get("split", "train"), []).append(
                (record["step"], record[key]))
    if not series:
        raise ValueError(f"no '{key}' values in the metrics history")
    figure = _figure()
    axes = figure.add_subplot()
    for split, points in sorted(series.items()):
        steps, values = zip(*sorted(points))
        axes.plot(steps, values, marker="o" if len(points) < 50 else None, markersize=3,
                  label=split)
    axes.set_xlabel("step")
    axes.set_ylabel("FSD violation (share of quantile levels)")
    axes.set_ylim(bottom=0.0)
    axes.set_title("First-order dominance violation: chosen vs rejected rewards")
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


# ---------------------------------------------------------------------- throughput


def matmul_params(model_cfg) -> int:
    """N of the docstring: weights that take part in a matmul per token (embedding excluded)."""
    h, d = model_cfg.hidden_size, model_cfg.head_dim
    n_q, n_kv = model_cfg.num_attention_heads, model_cfg.query_groups
    layer = h * (n_q + 2 * n_kv) * d + n_q * d * h + 3 * h * model_cfg.ffn_hidden_size
    return model_cfg.num_layers * layer + h * model_cfg.vocab_size


def flops_per_token(model_cfg, seq_length: Optional[float] = None, training: bool = True) -> float:
    attention = 0.0 if seq_length is None else \
        4.0 * model_cfg.num_layers * model_cfg.num_attention_heads * model_cfg.head_dim * seq_length
    return (3.0 if training else 1.0) * (2.0 * matmul_params(model_cfg) + attention)


def peak_tflops_for(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a GPU by name, or None when unknown."""
    name = (device_name or "").upper()
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def throughput(tokens: float, seconds: float, model_cfg, world_size: int, *,
               seq_length: Optional[float] = None, forward_only_tokens: float = 0,
               peak_tflops: Optional[float] = None, device_name: Optional[str] = None) -> dict:
    """tokens/s and an MFU estimate for ``tokens`` trained (forward + backward, all ranks) and
    ``forward_only_tokens`` scored without grad in ``seconds``. Keys: tokens_per_s,
    tokens_per_s_per_device, tflops_per_device, mfu (None on CPU or an unknown device)."""
    if seconds <= 0:
        raise ValueError(f"throughput: seconds must be > 0, got {seconds}")
    flops = tokens * flops_per_token(model_cfg, seq_length, training=True) \
        + forward_only_tokens * flops_per_token(model_cfg, seq_length, training=False)
    per_device = flops / seconds / world_size / 1e12
    if peak_tflops is None:
        if device_name is None:
            device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        peak_tflops = peak_tflops_for(device_name)
    return {"tokens_per_s": tokens / seconds,
            "tokens_per_s_per_device": tokens / seconds / world_size,
            "tflops_per_device": per_device,
            "mfu": None if peak_tflops is None else per_device / peak_tflops}


# ---------------------------------------------------------------------- one run


class RunReporter:
    """What one training run reports, from its config (rank 0 writes; ``enabled=False``
    elsewhere)."""

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
        fsd = plot_fsd_violation(self.metrics_path,
                                 os.path.join(self.plot_dir, "fsd_violation.png"))
        self.plots = sorted({*self.plots, latest, fsd})

    def resumed(self, path: str, step: int) -> None:
        if self.enabled:
            print(f"resumed from {path} at step {step}", flush=True)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


__all__ = ["RunReporter", "MetricsLogger", "ProgressBar", "read_history", "truncate_history",
           "plot_reward_cdfs", "plot_fsd_violation", "throughput", "flops_per_token",
           "matmul_params", "peak_tflops_for", "METRICS_FILE", "PEAK_BF16_TFLOPS"]
