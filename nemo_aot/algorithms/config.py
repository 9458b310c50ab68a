"""The one typed schema of an AOT run and its Hydra composition.

``AOTConfig`` composes the sub-schemas (model, precision, parallel, data, alignment, peft,
performance) with the run sections defined here (trainer, optim, checkpoint, logging). Defaults
live only in these dataclasses, each field with its help text; YAML under ``conf/`` overrides
them. ``compose_raw`` runs Hydra's compose API over the structured schema and ``typed_config``
turns the result into an ``AOTConfig``, so an unknown key fails at compose time (with close
matches). Each section validates its own fields; the rules across sections, the world size and
the checkpoint are ``nemo_aot.algorithms.resolve``'s, which turns all of it into the one
``ResolvedRun`` every consumer takes.

Where ``conf/`` comes from (first hit wins): the ``config_dir`` argument; ``conf/`` next to the
package in a source checkout; ``nemo_aot/conf`` inside an installed package. The canonical copy
is the top-level ``conf/``; ``nemo_aot/conf`` is a link to it, so a wheel ships the same files.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, get_type_hints

import yaml

from nemo_aot.data.config import DataConfig
from nemo_aot.distributed.parallel import ParallelConfig
from nemo_aot.losses.config import AlignmentConfig
from nemo_aot.models.config import GPTModelConfig, default_tiny
from nemo_aot.models.options import PeftConfig, PrecisionConfig
from nemo_aot.models.performance import PerformanceConfig

# hydra/omegaconf imported lazily: `nemo-aot --help` (which lists the recipes from here) must
# not load them.

SCHEMA_NAME = "aot_schema"
# A YAML value ``${required:<what it is>}`` marks a key the user must set (``???`` cannot: OmegaConf
# keeps the schema default when merging ``???`` over it).
REQUIRED_PREFIX = "${required:"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP8_PAD_MULTIPLE = 16


@dataclass
class TrainerConfig:
    """How long to train, batch geometry, validation cadence and step-level safety."""

    seed: int = 1234
    """Seed of the model init and of megatron's RNG tracker (data order uses data.seed)."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; null = run max_epochs. When both are set, the first reached wins."""
    max_epochs: Optional[int] = 1
    """Passes over the training data; null = run max_steps."""
    global_batch_size: int = 32
    """Samples per optimizer step over all data-parallel ranks (pairs for paired data,
    sequences for unpaired data). A multiple of micro_batch_size x data-parallel size."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one rank (gradient accumulation covers the rest)."""
    val_check_interval: int = 50
    """Validate every this many optimizer steps."""
    limit_val_batches: Optional[int] = None
    """Validation global batches per validation; null = the whole validation set."""
    max_time_minutes: Optional[float] = None
    """Wall-clock budget: once a step ends past it, save a checkpoint and exit 0. Leave room
    under the scheduler's time limit for one step plus the save. null = no budget."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this; 0 disables clipping."""
    nonfinite: str = "skip"
    """On a NaN/Inf loss or gradient norm: skip (no parameter update, counted and logged) or
    abort (stop with an error naming the step)."""
    log_every_n_steps: int = 1
    """Write training metrics every this many steps."""
    num_nodes: int = 1
    """Nodes the job runs on; with devices, the expected world size."""
    devices: Optional[int] = None
    """Ranks (GPUs) per node. When set, the layout is checked at compose time against
    num_nodes x devices and the launched world size must match; null = take the world size
    from the launcher."""

    def validate(self) -> None:
        _positive("trainer", self, "global_batch_size", "micro_batch_size", "val_check_interval",
                  "log_every_n_steps", "num_nodes")
        _positive_or_none("trainer", self, "max_steps", "max_epochs", "limit_val_batches",
                          "max_time_minutes", "devices")
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("trainer.max_steps and trainer.max_epochs are both null; set one")
        if self.grad_clip < 0:
            raise ValueError(f"trainer.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _choice("trainer.nonfinite", self.nonfinite, ("skip", "abort"))


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay (megatron-core) and the learning-rate schedule."""

    lr: float = 1e-6
    """Peak learning rate (reached after warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); not applied to norms and biases."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.98
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr over this many steps."""
    lr_decay_style: str = "cosine"
    """cosine or linear decay from lr to min_lr over the remaining steps of the run, or
    constant (lr after warmup)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state and fp32 main weights over the data-parallel group (ZeRO-1)."""
    fused_adam: Optional[bool] = None
    """torch's AdamW (megatron-core's optimizer where neither TransformerEngine nor apex is
    importable) with its fused kernel: null = on a CUDA GPU, true = also on CPU, false =
    torch's default (foreach on GPU). TE's/apex's FusedAdam, when megatron uses one, is fused
    already and this key changes nothing."""

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.adam_eps > 0:
            raise ValueError(f"optim.adam_eps must be > 0, got {self.adam_eps}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _choice("optim.lr_decay_style", self.lr_decay_style, ("cosine", "linear", "constant"))
        if self.fused_adam is not None and not isinstance(self.fused_adam, bool):
            raise ValueError(f"optim.fused_adam must be true, false or null (fused on a GPU), "
                             f"got {self.fused_adam!r}")


@dataclass
class CheckpointConfig:
    """Resumable training state (see nemo_aot.algorithms.checkpointing) and the final .nemo."""

    dir: Optional[str] = None
    """Checkpoint root (one step_NNNNNNNN folder per save); null = <logging.output_dir>/checkpoints.
    Multi-node runs need it on a filesystem every node sees."""
    save_interval: int = 100
    """Save every this many optimizer steps; 0 = only on signals, time budget and at the end."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after each successful save."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint under dir, if any; never: start from
    init_from (or random init) even when dir holds checkpoints."""
    save_on_signal: bool = True
    """On SIGTERM/SIGUSR1 (e.g. SLURM preemption), finish the step, save, and exit 0."""
    export_nemo_at_end: bool = True
    """Write <logging.output_dir>/aot_policy.nemo when training finishes."""
    allow_config_change: bool = False
    """Resume even when the checkpoint was trained with another config (loss, lr, data...;
    the run's length, cadences and outputs may always change): the changed keys are logged and
    recorded in <logging.output_dir>/config_changes.jsonl, and the run continues with its new
    config (the LR schedule rebuilt at the checkpoint's step)."""

    def validate(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval must be >= 0, got {self.save_interval}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        _choice("checkpoint.resume", self.resume, ("auto", "never"))


@dataclass
class LoggingConfig:
    """Where outputs go and how progress is reported (rank 0 only)."""

    output_dir: str = "aot_output"
    """Run folder: metrics.jsonl, tensorboard/, plots/, resolved config, final .nemo."""
    tensorboard: bool = True
    """Write TensorBoard scalars under <output_dir>/tensorboard."""
    wandb_project: Optional[str] = None
    """Weights & Biases project; null disables W&B (the package is optional)."""
    wandb_run_name: Optional[str] = None
    """W&B run name; null lets W&B pick one."""
    wandb_mode: str = "offline"
    """offline (write under <output_dir>/wandb, upload later with `wandb sync`), online, or
    disabled."""
    plot_every_validation: bool = True
    """At each validation write the chosen vs rejected reward CDFs and the FSD violation curve
    as PNGs under <output_dir>/plots."""
    progress_bar: bool = True
    """Console progress bar (rank 0) with loss, reward margin, accuracy, FSD violation, tok/s."""
    peak_tflops: Optional[float] = None
    """Per-device peak dense TFLOP/s for the MFU estimate; null = look the GPU up in a table
    (MFU is reported as null on CPU or an unknown device)."""

    def validate(self) -> None:
        if not self.output_dir:
            raise ValueError("logging.output_dir is empty; set it to a folder for run outputs")
        _choice("logging.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        _positive_or_none("logging", self, "peak_tflops")


@dataclass
class AOTConfig:
    """Everything one AOT run needs; every section validates itself, then the cross rules."""

    model: GPTModelConfig = field(default_factory=default_tiny)
    """Architecture (with init_from set, it must match the .nemo's; it also lets the parallel
    layout be checked before anything is loaded)."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Dtype, transformer implementation and FP8."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline parallel layout; data parallelism takes the remaining ranks."""
    data: DataConfig = field(default_factory=DataConfig)
    """Preference data and tokenization."""
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    """The AOT/DPO objective, its sort scope and the reference policy."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Full fine-tuning (scheme none) or LoRA adapters on the frozen policy (``peft=lora``)."""
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    """Activation recomputation, communication overlap, fused kernels (none changes results)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Run length, batch sizes, validation, safety."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints, resume and export."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Outputs, metrics, plots."""
    init_from: Optional[str] = None
    """A .nemo policy to start from (also the reference policy); null = random init from model."""

def _positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{section}.{key} must be a positive integer, got {value!r}")


def _positive_or_none(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and not value > 0:
            raise ValueError(f"{section}.{key} must be > 0 or null, got {value!r}")


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {list(allowed)}, got {value!r}")


# --------------------------------------------------------------------------- composition


def find_config_dir(config_dir: Optional[str] = None) -> str:
    """The conf/ folder: config_dir, else the checkout's conf/, else the installed package's."""
    candidates = [config_dir] if config_dir else [
        os.path.join(os.path.dirname(_PACKAGE_DIR), "conf"), os.path.join(_PACKAGE_DIR, "conf")]
    for path in candidates:
        if os.path.isdir(path):
            return os.path.abspath(path)
    raise ValueError(f"config directory not found (looked in {candidates}); pass config_dir=")


def register_schema() -> None:
    """Register AOTConfig in Hydra's ConfigStore as ``aot_schema`` (for ``@hydra.main`` users)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=AOTConfig)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _unset_required)


def _unset_required(what: str = "a value") -> Any:
    raise ValueError(f"a required key is unset ({what}); set it on the command line")


def compose_raw(config_name: str = "gpt_aot", overrides: Sequence[str] = (),
                config_dir: Optional[str] = None):
    """The composed, unvalidated DictConfig (struct mode over the schema); ValueError on
    unknown keys, bad types, missing config files or unparsable YAML."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    register_schema()
    directory = find_config_dir(config_dir)
    outer = get_gh_backup()  # e.g. inside @hydra.main: put its global state back afterwards
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=directory, version_base=None, job_name="nemo_aot"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        message = _explain(err, config_name)
        if "You must specify 'recipe'" in message:
            message += ("\n(recipe=base: the schema's defaults with your own init_from and data; "
                        "recipe=demo: the bundled tiny run; see conf/recipe/)")
        raise ValueError(message) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{config_name}: a YAML file under {directory} does not parse: "
                         f"{err}") from None
    except (AssertionError, AttributeError) as err:  # OmegaConf: overriding inside a null section
        raise ValueError(
            f"{config_name}: could not apply overrides {list(overrides)} "
            f"({str(err).splitlines()[0]}). Keys inside a section that is null (e.g. "
            "model.rope_scaling) cannot be set from the command line; pick a config that sets "
            "the section (e.g. model=llama3_1_8b) or set it in a YAML file") from None
    finally:
        restore_gh_from_backup(outer)


def typed_config(raw: Any) -> AOTConfig:
    """A composed DictConfig (or a plain dict) -> AOTConfig, not yet validated (that is
    ``resolve``'s work): unknown keys fail (also those added with Hydra's ``+``/``++``), keys
    a config marks required and the user left unset are listed, bad types name the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    plain = OmegaConf.to_container(raw, resolve=False) if OmegaConf.is_config(raw) else raw
    unknown = unknown_keys(plain or {})
    if unknown:
        raise ValueError("config: " + "; ".join(
            f"{key}: no such key{_suggest(key)}" for key in unknown))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AOTConfig), raw)
        required = required_keys(merged)
        if required:
            listed = "".join(f"\n  {key}: {what}" for key, what in required.items())
            raise ValueError(f"this config needs values for these keys (set them on the command "
                             f"line, e.g. {next(iter(required))}=<value>):{listed}")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err, "config")) from None


def unknown_keys(node: Any, schema: Any = None, prefix: str = "") -> list[str]:
    """Dotted keys of a plain nested dict that the dataclass schema (AOTConfig) does not have.
    Free-form fields (dicts such as data.columns) take any key."""
    schema = AOTConfig if schema is None else schema
    known = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in known:
            found.append(full)
            continue
        sub = _field_type(schema, key)
        if sub is not None and isinstance(value, dict):
            found.extend(unknown_keys(value, sub, f"{full}."))
    return found


def required_keys(raw: Any) -> dict[str, str]:
    """Keys a config marks ``${required:<what>}`` and the user has not set: {key: what}."""
    from omegaconf import OmegaConf

    found: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, str) and node.startswith(REQUIRED_PREFIX) and node.endswith("}"):
            found[prefix] = node[len(REQUIRED_PREFIX):-1].strip().strip("'\"")

    walk(OmegaConf.to_container(raw, resolve=False) if OmegaConf.is_config(raw) else raw, "")
    return found


def to_yaml(cfg: AOTConfig) -> str:
    """The fully resolved config as YAML (logged at start and saved with every checkpoint)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: AOTConfig) -> str:
    """A short stable digest of the resolved config, stored in checkpoint markers."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def _explain(err: BaseException, source: str) -> str:
    """Hydra/OmegaConf error -> one message naming the key, with close matches when unknown."""
    cause = err
    while cause.__cause__ is not None and getattr(cause, "full_key", None) is None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None) or getattr(err, "full_key", None)
    text = str(cause if key else err).strip()
    found = re.search(r"^\s*full_key: (\S+)", text, re.MULTILINE)
    key = key or (found.group(1) if found else None)
    if key:
        what = " ".join(line.strip()
                        for line in text[:found.start() if found else None].splitlines())
        return f"{source}: {key}: {what}{_suggest(str(key))}"
    return f"{source}: {text}"


def _suggest(full_key: str) -> str:
    """' Did you mean ...?' for the first unknown component of a dotted key, or ''."""
    node: Any = AOTConfig
    path = []
    for part in full_key.split("."):
        if not dataclasses.is_dataclass(node):
            return ""
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=3, cutoff=0.6)
            prefix = ".".join(path)
            names = [f"{prefix}.{c}" if prefix else c for c in close]
            return f". Did you mean {' or '.join(names)}?" if names else \
                f". Known keys here: {sorted(fields)}"
        path.append(part)
        node = _field_type(node, part)
    return ""


def _field_type(cls: Any, name: str) -> Any:
    hint = get_type_hints(cls).get(name)
    for arg in (getattr(hint, "__args__", None) or (hint,)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


__all__ = ["AOTConfig", "TrainerConfig", "OptimConfig", "CheckpointConfig", "LoggingConfig",
           "compose_raw", "typed_config", "to_yaml", "config_hash", "find_config_dir",
           "register_schema", "required_keys", "unknown_keys", "SCHEMA_NAME"]
