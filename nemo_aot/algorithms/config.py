"""The one typed schema of an AOT run, its cross-section rules, and Hydra composition.

``AOTConfig`` composes the sub-schemas (model, precision, parallel, data, alignment) with the
run sections defined here (trainer, optim, checkpoint, logging). Defaults live only in these
dataclasses; YAML under ``conf/`` overrides them. ``compose_config`` runs Hydra's compose API
over the structured schema, so an unknown key fails at compose time (with close matches), and
``AOTConfig.validate`` refuses impossible combinations before any process group or model exists.

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

from nemo_aot.data.config import DataConfig, resolve_path
from nemo_aot.distributed.parallel import ParallelConfig
from nemo_aot.losses import LOSS_SPECS, get_loss_spec
from nemo_aot.losses.config import AlignmentConfig
from nemo_aot.models.config import GPTModelConfig, default_tiny
from nemo_aot.models.nemo_format import read_nemo_config
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

    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.logging.output_dir, "checkpoints")

    def world_size(self, launched: Optional[int] = None) -> Optional[int]:
        """The world size to validate against: the launched one, else num_nodes x devices."""
        t = self.trainer
        expected = None if t.devices is None else t.num_nodes * t.devices
        if launched is not None and expected is not None and launched != expected:
            raise ValueError(
                f"trainer.num_nodes x trainer.devices = {self.trainer.num_nodes} x "
                f"{self.trainer.devices} = {expected}, but {launched} ranks were launched; set "
                f"trainer.devices/num_nodes to match the launch (or trainer.devices=null)")
        return launched if launched is not None else expected

    def validate(self, world_size: Optional[int] = None) -> "AOTConfig":
        """Check every section and the cross-section rules; ValueError names the key."""
        self.model.validate()
        self.precision.validate()
        self.data.validate()
        self.alignment.validate()
        self.peft.validate()
        for section in (self.trainer, self.optim, self.checkpoint, self.logging):
            section.validate()
        if self.init_from is not None and not str(self.init_from).strip():
            raise ValueError("init_from is empty; set it to a .nemo path or to null")
        if self.data.tokenizer_path is None and not self.init_from:
            raise ValueError("data.tokenizer_path is null and there is no init_from to take the "
                             "tokenizer from; set data.tokenizer_path to a tokenizer folder")
        world = self.world_size(world_size)
        model_parallel = (self.parallel.tensor_model_parallel_size
                          * self.parallel.pipeline_model_parallel_size)
        # Without a world size, the layout rules that do not depend on it still run (DP = 1).
        self.parallel.validate(world if world is not None else model_parallel, self.model)
        _check_batches(self, None if world is None else self.parallel.data_parallel_size(world))
        _check_sequences(self)
        _check_objective(self, None if world is None else self.parallel.data_parallel_size(world))
        _check_fp8(self)
        _check_peft(self)
        self.performance.validate(self.model, self.parallel, self.precision,
                                  self.optim.use_distributed_optimizer)
        return self


def _check_peft(cfg: AOTConfig) -> None:
    """LoRA's combinations with the reference policy, the sort scope and FP8."""
    a, peft = cfg.alignment, cfg.peft
    if a.reference_policy == "adapters_off" and not peft.enabled:
        raise ValueError("alignment.reference_policy=adapters_off needs LoRA adapters to switch "
                         "off: add peft=lora (or use alignment.reference_policy=cached)")
    if not peft.enabled:
        return
    if a.reference_policy == "cpu_swap":
        raise ValueError("alignment.reference_policy=cpu_swap with peft.scheme=lora would keep "
                         "a second copy of every frozen weight; use alignment.reference_policy="
                         "adapters_off (the base without adapters) or cached")
    if peft.dropout > 0 and a.sort_scope == "global":
        raise ValueError(f"peft.dropout={peft.dropout} with alignment.sort_scope=global: the grad "
                         "pass could not reproduce the no-grad pass's rewards; set "
                         "peft.dropout=0 or use sort_scope=data_parallel")
    if cfg.precision.fp8_param:
        raise ValueError("precision.fp8_param with peft.scheme=lora: adapters are merged into "
                         "the base weights on export, which FP8 weights cannot hold exactly; "
                         "set precision.fp8_param=false")
    p = cfg.precision
    if p.fp8 is not None and p.fp8_recipe == "delayed" and a.reference_policy == "adapters_off":
        raise ValueError("alignment.reference_policy=adapters_off with precision.fp8_recipe="
                         "delayed: the reference forward would shift the policy's amax history; "
                         "use alignment.reference_policy=cached or precision.fp8_recipe=tensorwise")
    if peft.adapter_from is not None and not cfg.init_from:
        raise ValueError("peft.adapter_from needs init_from: the base .nemo the adapter was "
                         "trained on")


def _check_fp8(cfg: AOTConfig) -> None:
    """FP8 combinations that cannot be made right are refused before anything is built."""
    p, a = cfg.precision, cfg.alignment
    if p.fp8_param and not cfg.optim.use_distributed_optimizer:
        raise ValueError("precision.fp8_param needs optim.use_distributed_optimizer=true")
    if p.fp8 is not None and p.fp8_recipe == "delayed" and a.sort_scope == "global":
        # The global scope's no-grad first pass runs the FP8 forward too and updates TE's amax
        # history, so the grad pass would run at other scales and fail its reproduce check.
        raise ValueError("alignment.sort_scope=global with precision.fp8_recipe=delayed: the "
                         "first (no-grad) pass would shift the delayed-scaling amax history "
                         "the grad pass must reproduce; use precision.fp8_recipe=tensorwise "
                         "(current scaling) or alignment.sort_scope=data_parallel")
    if p.fp8_param and a.reference_policy == "cpu_swap":
        raise ValueError("precision.fp8_param with alignment.reference_policy=cpu_swap would "
                         "re-quantize the reference weights on every swap (they would drift "
                         "from the checkpoint); use alignment.reference_policy=cached")
    if p.fp8 is not None and p.fp8_recipe == "delayed" and a.reference_policy == "cpu_swap":
        # The swapped-in reference runs through the policy's modules: its forward would enter
        # the policy's delayed-scaling amax history.
        raise ValueError("alignment.reference_policy=cpu_swap with precision.fp8_recipe=delayed: "
                         "the reference forward would shift the policy's amax history; use "
                         "alignment.reference_policy=cached or precision.fp8_recipe=tensorwise")


def _check_batches(cfg: AOTConfig, dp: Optional[int]) -> None:
    t, p = cfg.trainer, cfg.parallel
    per_step = t.micro_batch_size * (dp or 1)
    if t.global_batch_size % per_step:
        where = f" x data-parallel size ({dp})" if dp else ""
        raise ValueError(f"trainer.global_batch_size={t.global_batch_size} must be a multiple of "
                         f"trainer.micro_batch_size ({t.micro_batch_size}){where}")
    if dp and p.virtual_pipeline_model_parallel_size:
        micro_batches = t.global_batch_size // per_step
        if micro_batches % p.pipeline_model_parallel_size:
            raise ValueError(
                f"trainer.global_batch_size: interleaved pipelining needs the micro-batches per "
                f"rank ({micro_batches}) to be a multiple of parallel.pipeline_model_parallel_size "
                f"({p.pipeline_model_parallel_size})")
    if t.max_steps is not None and cfg.optim.warmup_steps >= t.max_steps:
        raise ValueError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be smaller than "
                         f"trainer.max_steps={t.max_steps} (the LR schedule needs decay steps)")
    if cfg.data.kind == "unpaired" and t.micro_batch_size < 2:
        raise ValueError("trainer.micro_batch_size must be >= 2 for unpaired data (one positive "
                         "and one negative per micro-batch)")


def _check_sequences(cfg: AOTConfig) -> None:
    data, p = cfg.data, cfg.parallel
    if data.max_seq_length > cfg.model.encoder_seq_length:
        raise ValueError(f"data.max_seq_length={data.max_seq_length} exceeds "
                         f"model.encoder_seq_length={cfg.model.encoder_seq_length}; lower it")
    if cfg.precision.fp8 is not None and data.pad_to_multiple_of % FP8_PAD_MULTIPLE:
        raise ValueError(f"data.pad_to_multiple_of must be a multiple of {FP8_PAD_MULTIPLE} under "
                         f"precision.fp8 (FP8 GEMM shapes), got {data.pad_to_multiple_of}")
    if p.sequence_parallel and data.pad_to_multiple_of % p.tensor_model_parallel_size:
        raise ValueError(f"data.pad_to_multiple_of={data.pad_to_multiple_of} must be a multiple of "
                         f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} "
                         f"under sequence parallelism (the sequence is split across the TP group)")
    if p.pipeline_model_parallel_size > 1 and not data.uniform_step_length:
        raise ValueError("data.uniform_step_length must be true with pipeline parallelism (stages "
                         "exchange activations of one fixed shape per step)")
    if data.pack_sequences and (cfg.precision.transformer_impl != "local"
                                or cfg.model.attention_backend != "sdpa"):
        raise ValueError("data.pack_sequences needs precision.transformer_impl=local and "
                         "model.attention_backend=sdpa (the per-document attention mask goes "
                         "through SDPA; TransformerEngine's THD packing is not wired up yet); "
                         "set data.pack_sequences=false for this model")


def _check_objective(cfg: AOTConfig, dp: Optional[int]) -> None:
    a, t = cfg.alignment, cfg.trainer
    spec = get_loss_spec(a.loss_type)
    if cfg.data.kind is not None:  # format=auto on one file: checked when the data are read
        check_data_kind(a.loss_type, cfg.data.kind, cfg.data.kind_source())
    # A loss that never sorts gains nothing from a wider sort scope but communication.
    if not spec.sorts and a.sort_scope == "global":
        raise ValueError(f"alignment.sort_scope=global costs an extra forward pass per step but "
                         f"{a.loss_type} never sorts; set alignment.sort_scope=micro")
    if not spec.sorts:
        return
    sort_size = {"micro": t.micro_batch_size, "global": t.global_batch_size,
                 "data_parallel": t.micro_batch_size * (dp or 1)}[a.sort_scope]
    if sort_size < 2 and (dp is not None or a.sort_scope != "data_parallel"):
        raise ValueError(
            f"alignment.sort_scope={a.sort_scope} with trainer.micro_batch_size="
            f"{t.micro_batch_size} sorts a single sample, which makes {a.loss_type} exactly DPO; "
            "raise trainer.micro_batch_size or use sort_scope=data_parallel/global")


def check_data_kind(loss_type: str, kind: str, source: str) -> None:
    """Refuse data of a kind the objective does not train on, naming both keys and the losses
    that fit (``source``: the keys or file that make the data that kind)."""
    spec = get_loss_spec(loss_type)
    if kind in spec.data_kinds:
        return
    fits = [name for name, s in LOSS_SPECS.items() if kind in s.data_kinds]
    raise ValueError(f"alignment.loss_type={loss_type} trains on {' or '.join(spec.data_kinds)} "
                     f"data, but {source} gives {kind} data; use alignment.loss_type="
                     f"{' or '.join(fits)} for it (or give {spec.data_kinds[0]} data)")


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


def compose_config(config_name: str = "gpt_aot", overrides: Sequence[str] = (),
                   config_dir: Optional[str] = None, world_size: Optional[int] = None) -> AOTConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra command-line style ``overrides``, convert
    to AOTConfig and validate it. ``world_size`` defaults to $WORLD_SIZE when a launcher set it,
    else to trainer.num_nodes x trainer.devices, else only size-independent rules run."""
    raw = compose_raw(config_name, overrides, config_dir)
    if world_size is None and os.environ.get("WORLD_SIZE"):
        world_size = int(os.environ["WORLD_SIZE"])
    cfg = to_aot_config(raw, world_size)
    check_model_overrides(raw, cfg, overrides)
    return cfg


def check_model_overrides(raw: Any, cfg: AOTConfig, overrides: Sequence[str]) -> None:
    """Refuse a ``model.<key>=`` override that contradicts the checkpoint's architecture (the
    checkpoint defines the model; the override would be silently dropped)."""
    from omegaconf import OmegaConf

    if not cfg.init_from:
        return
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if not key.startswith("model.") or "=" not in item:
            continue
        wanted, stored = OmegaConf.select(raw, key), cfg.model
        for part in key.split(".")[1:]:
            stored = getattr(stored, part, None)
        if dataclasses.is_dataclass(stored):
            stored = dataclasses.asdict(stored)
        if wanted != stored:
            raise ValueError(f"{key}={wanted} contradicts init_from {cfg.init_from}, whose "
                             f"architecture has {key}={stored}; the checkpoint defines the "
                             "model: drop the override (or convert a checkpoint that has it)")


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


def to_aot_config(raw: Any, world_size: Optional[int] = None, *,
                  adopt_init_from: bool = True) -> AOTConfig:
    """A composed DictConfig (or a plain dict) -> validated AOTConfig; unknown keys fail (also
    those added with Hydra's ``+``/``++``). With ``adopt_init_from``, the architecture is read
    from ``init_from``'s .nemo (see ``adopt_checkpoint_architecture``) before validation, so the
    parallel layout is checked against the model that will be trained."""
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
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err, "config")) from None
    if adopt_init_from:
        cfg = adopt_checkpoint_architecture(cfg)
    return cfg.validate(world_size)


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


def adopt_checkpoint_architecture(cfg: AOTConfig) -> AOTConfig:
    """``cfg`` with the model section read from ``init_from`` (a .nemo file or an extracted
    .nemo folder): the checkpoint defines the architecture; the model group of a recipe only
    stands in for it when there is no checkpoint."""
    if not cfg.init_from or not str(cfg.init_from).strip():
        return cfg
    path = resolve_path(cfg.init_from)
    if not os.path.exists(path):
        raise ValueError(f"init_from: {cfg.init_from} does not exist; point it at a .nemo file "
                         "or an extracted .nemo folder (convert Hugging Face checkpoints with "
                         "`nemo-aot convert hf-to-nemo`)")
    model, _ = read_nemo_config(path)
    return dataclasses.replace(cfg, model=model)


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


def load_config(path: str, world_size: Optional[int] = None) -> AOTConfig:
    """Read a YAML written by ``to_yaml`` (e.g. a run's resolved config) back into AOTConfig."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist")
    # A resolved config already holds the architecture; init_from may be gone by now.
    return to_aot_config(OmegaConf.load(path), world_size, adopt_init_from=False)


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
           "compose_config", "compose_raw", "to_aot_config", "load_config", "to_yaml",
           "config_hash", "find_config_dir", "register_schema", "required_keys", "unknown_keys",
           "check_model_overrides", "adopt_checkpoint_architecture", "check_data_kind",
           "SCHEMA_NAME"]
