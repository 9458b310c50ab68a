"""One resolution of a run: (recipe, overrides, world) -> an immutable ``ResolvedRun``.

Every consumer - ``nemo-aot train`` and ``demo``, ``--print-config``, ``--plan``, the launcher,
``nemo-aot export``, SFT and the experiments - resolves once here and takes the result; none of
them re-reads the raw config, re-derives the layout, the run's length or the data kind, or
re-opens ``init_from`` for its architecture. In order:

1. compose the recipe and overrides over the typed schema (``config.compose_raw`` and
   ``typed_config``: unknown keys, unset required keys and bad types fail here);
2. the starting checkpoint: ``init_from`` (``bundled:`` expanded) - a .nemo, a Hugging Face
   model folder or a hub id ``org/name[@revision]`` (``nemo_aot.conversion.sources``) - defines
   the architecture; a ``model.*`` override that contradicts it is refused. Training converts a
   Hugging Face source once (cached) and loads that .nemo; printing and planning read its
   ``config.json`` only (``purpose``). ``--plan`` needs neither data nor a checkpoint: data keys a
   recipe requires are filled with a marker it never opens, and without ``init_from`` the
   recipe's ``model`` is planned;
3. the world: the launched world size (the ``World`` a launcher or ``WORLD_SIZE`` gives) must
   match ``trainer.num_nodes`` x ``trainer.devices`` when those are set; unknown (printing a
   config or a plan on a login node) only the rules that do not depend on it run;
4. every section's rules and the rules across them (``rules.check_rules``), once;
5. the value: the config, the layout, the schedule (run length, warmup, batches), the data
   kind, the sort group, the init source and the output paths.

The run's length depends on the training data when ``trainer.max_epochs`` limits it:
``Schedule.for_epoch_length`` completes it once the data are read (one value, checked once).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Optional, Sequence

from nemo_aot.algorithms.config import (
    AOTConfig,
    compose_raw,
    config_hash,
    required_keys,
    to_yaml,
    typed_config,
)
from nemo_aot.algorithms.rules import check_rules, sort_group_size
from nemo_aot.conversion.sources import (
    HUB_ID,
    CheckpointSource,
    checkpoint_source,
    local_nemo,
    read_architecture,
)
from nemo_aot.data.config import resolve_path
from nemo_aot.losses import get_loss_spec
from nemo_aot.models.nemo_format import read_nemo_config


@dataclasses.dataclass(frozen=True)
class World:
    """The ranks a run is resolved for: ``size`` ranks (None: not launched, e.g. printing a
    config or a plan), and where a launcher knows them, the nodes and ranks per node."""

    size: Optional[int] = None
    num_nodes: Optional[int] = None
    per_node: Optional[int] = None

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None,
                 default: Optional[int] = None) -> "World":
        """The world torchrun (or ``nemo-aot launch``) set up: ``WORLD_SIZE``, and
        ``LOCAL_WORLD_SIZE`` for the ranks per node; ``default`` ranks when none is set (1 for a
        process about to train alone, None for printing)."""
        env = os.environ if environ is None else environ
        if not env.get("WORLD_SIZE"):
            return cls(default)
        size = int(env["WORLD_SIZE"])
        per_node = int(env["LOCAL_WORLD_SIZE"]) if env.get("LOCAL_WORLD_SIZE") else None
        nodes = size // per_node if per_node and size % per_node == 0 else None
        return cls(size, nodes, per_node)

    @classmethod
    def planned(cls) -> "World":
        """For printing a config or a plan: the launched ranks if any, else unknown (then
        ``trainer.num_nodes`` x ``trainer.devices`` decide, when set)."""
        return cls.from_env(default=None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the ranks are split: tensor x pipeline x data parallel."""

    world_size: Optional[int]
    """Ranks in all; None when the run is resolved without a launch (printing)."""
    tensor: int
    pipeline: int
    virtual_pipeline: Optional[int]
    sequence_parallel: bool
    expert: int = 1
    """Expert-parallel ranks (EP) of a mixture-of-experts model; 1 for dense models."""
    expert_tensor: int = 1
    """Ranks that split each expert's weights (ETP)."""

    @property
    def expert_data_parallel(self) -> Optional[int]:
        """Replicas of each expert (the stage's ranks over ETP x EP); None when not launched."""
        if self.world_size is None:
            return None
        return self.world_size // (self.expert_tensor * self.expert * self.pipeline)

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    @property
    def data_parallel(self) -> Optional[int]:
        return None if self.world_size is None else self.world_size // self.model_parallel

    def describe(self) -> str:
        dp = self.data_parallel if self.data_parallel is not None else "?"
        ranks = self.world_size if self.world_size is not None else "? (not launched)"
        text = (f"TP {self.tensor} x PP {self.pipeline} x DP {dp} = {ranks} ranks (sequence "
                f"parallel {'on' if self.sequence_parallel else 'off'}, virtual pipeline "
                f"{self.virtual_pipeline or 'off'})")
        if self.expert > 1 or self.expert_tensor != self.tensor:
            edp = self.expert_data_parallel if self.expert_data_parallel is not None else "?"
            text += (f"; experts: ETP {self.expert_tensor} x EP {self.expert} x expert-DP {edp} "
                     f"x PP {self.pipeline}")
        return text


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The run's length and batches: whichever of ``max_steps`` and ``max_epochs`` ends first,
    warmup, then decay to ``optim.min_lr`` over the rest (megatron counts samples)."""

    max_steps: Optional[int]
    max_epochs: Optional[int]
    warmup_steps: int
    global_batch_size: int
    micro_batch_size: int
    steps_per_epoch: Optional[int] = None
    """Optimizer steps per pass over the training data; known once the data are read."""

    @property
    def total_steps(self) -> Optional[int]:
        """Optimizer steps of the run; None while an epoch limit waits for the data."""
        limits = [] if self.max_steps is None else [self.max_steps]
        if self.max_epochs is not None:
            if self.steps_per_epoch is None:
                return None
            limits.append(self.steps_per_epoch * self.max_epochs)
        return min(limits)

    def stop_reason(self, step: int) -> Optional[str]:
        """``max_steps`` or ``max_epochs`` once ``step`` reaches the run's length, else None."""
        total = self.total_steps
        if total is None or step < total:
            return None
        return "max_steps" if self.max_steps == total else "max_epochs"

    def for_epoch_length(self, steps_per_epoch: int) -> "Schedule":
        """This schedule with the training data's steps per epoch, checked."""
        return dataclasses.replace(self, steps_per_epoch=steps_per_epoch).checked()

    def checked(self) -> "Schedule":
        """The LR schedule needs at least one step after warmup: say which keys set the length
        (a run limited by max_steps alone is checked at resolution, others when the data are
        read)."""
        total = self.total_steps
        if total is None or self.warmup_steps < total:
            return self
        limits = []
        if self.max_steps is not None:
            limits.append(f"trainer.max_steps={self.max_steps}")
        if self.max_epochs is not None:
            limits.append(f"trainer.max_epochs={self.max_epochs} x {self.steps_per_epoch} steps "
                          f"per epoch (the training data at trainer.global_batch_size="
                          f"{self.global_batch_size})")
        length = f"the run is {total} optimizer steps long ({' and '.join(limits)})"
        if total < 1:
            raise ValueError(f"{length}; lower trainer.global_batch_size or add training data")
        raise ValueError(f"optim.warmup_steps={self.warmup_steps} is not smaller than the run: "
                         f"{length}; lower optim.warmup_steps (the LR schedule needs decay steps)")

    def describe(self) -> str:
        limits = [f"max_steps {self.max_steps}"] if self.max_steps is not None else []
        if self.max_epochs is not None:
            per = self.steps_per_epoch if self.steps_per_epoch is not None else \
                "set by the training data"
            limits.append(f"max_epochs {self.max_epochs} (steps per epoch: {per})")
        return f"{' or '.join(limits)}, first reached wins; warmup {self.warmup_steps} steps"


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """Everything decided about a run before anything is built; never modified afterwards."""

    config: AOTConfig
    """The typed, validated config (the architecture is init_from's); read, never written."""
    layout: Layout
    schedule: Schedule
    data_kind: Optional[str]
    """paired or unpaired (``nemo_aot.data.config.DATA_KINDS``); None when data.format=auto
    leaves it to the first record (checked against the objective when the data are read)."""
    sort_group: Optional[int]
    """Samples one sort sees (None: the loss never sorts, or the data-parallel size is not
    known yet)."""
    init_from: Optional[str]
    """The local path of the starting checkpoint (``bundled:`` expanded), or None."""
    output_dir: str
    checkpoint_dir: str
    reference_cache_dir: str
    init_source: Optional[CheckpointSource] = None
    """How ``init_from`` was named (.nemo, Hugging Face folder or hub id); ``init_from`` is None
    for a Hugging Face source resolved for printing or planning (nothing converted)."""

    @functools.cached_property
    def config_yaml(self) -> str:
        """The resolved config as YAML (logged, written to the run folder and checkpoints)."""
        return to_yaml(self.config)

    @functools.cached_property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def describe(self) -> str:
        """``--print-config``: what was resolved, as YAML comments over the config itself."""
        a = self.config.alignment
        kind = self.data_kind or "paired or unpaired (data.format=auto: the first record)"
        sort = f"{self.sort_group} samples per sort" if self.sort_group else \
            ("sort size set by the launch" if get_loss_spec(a.loss_type).sorts else "no sort")
        lines = [
            "# nemo-aot: the resolved run",
            f"#   layout      {self.layout.describe()}",
            f"#   schedule    {self.schedule.describe()}",
            f"#   objective   {a.loss_type} on {kind} data; sort scope {a.sort_scope}: {sort}",
            f"#   init_from   {self._describe_init()}",
            f"#   outputs     {self.output_dir} (checkpoints {self.checkpoint_dir}, reference "
            f"cache {self.reference_cache_dir})",
        ]
        return "\n".join(lines) + "\n" + self.config_yaml

    def _describe_init(self) -> str:
        source = self.init_source
        if source is None or source.kind == "nemo":
            return self.init_from or "none (random init of model)"
        where = f"converted copy {self.init_from}" if self.init_from else \
            "architecture from its config.json; converted once when training starts"
        return f"{source.describe()}: {where}"


PURPOSES = ("train", "print", "plan")
"""What a run is resolved for: ``train`` (init_from's weights made local: a Hugging Face source
converted, cached), ``print`` (the architecture from its config only), ``plan`` (as ``print``,
and neither data nor ``init_from`` needed)."""
PLAN_MARKER = "<not read by --plan>"


def resolve_run(overrides: Sequence[str] = (), *, config_name: str = "gpt_aot",
                config_dir: Optional[str] = None, world: Optional[World] = None,
                purpose: str = "train") -> ResolvedRun:
    """Compose ``conf/<config_name>.yaml`` with Hydra command-line ``overrides`` and resolve it
    for ``world`` (default: this process's world: the launcher's ranks, else one process;
    ``World.planned()`` to print a config or plan for a launch that has not happened) and
    ``purpose`` (``PURPOSES``)."""
    raw = compose_raw(config_name, overrides, config_dir)
    return resolve_composed(raw, overrides, world=world, purpose=purpose)


def resolve_composed(raw: Any, overrides: Sequence[str] = (), *,
                     world: Optional[World] = None, purpose: str = "train") -> ResolvedRun:
    """Resolve an already composed config (e.g. the one ``@hydra.main`` hands a script);
    ``overrides`` are checked against init_from's architecture."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if purpose == "plan":
        raw = _unset_for_plan(raw)
    return _resolve(typed_config(raw), world, raw=raw, overrides=overrides,
                    weights=purpose == "train")


def resolve_config(cfg: AOTConfig, *, world: Optional[World] = None) -> ResolvedRun:
    """Resolve a typed config built in code (tests, experiments)."""
    return _resolve(cfg, world)


def resolve_stored(path: str, overrides: Sequence[str] = (), *,
                   world: Optional[World] = None) -> ResolvedRun:
    """Resolve a run's stored config (``config.yaml`` of a run folder or checkpoint) with
    ``KEY=VALUE`` overrides. It holds the architecture already (init_from may be gone)."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist")
    raw = OmegaConf.load(path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. "
                             "parallel.tensor_model_parallel_size=2")
    if overrides:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    return _resolve(typed_config(raw), world, adopt=False)


def compose_config(config_name: str = "gpt_aot", overrides: Sequence[str] = (),
                   config_dir: Optional[str] = None,
                   world_size: Optional[int] = None) -> AOTConfig:
    """The typed config of ``resolve_run`` (for code that only reads settings), resolved for
    ``world_size`` ranks or else ``World.planned()``."""
    world = World(world_size) if world_size is not None else World.planned()
    return resolve_run(overrides, config_name=config_name, config_dir=config_dir,
                       world=world, purpose="print").config


def _resolve(cfg: AOTConfig, world: Optional[World], *, raw: Any = None,
             overrides: Sequence[str] = (), adopt: bool = True,
             weights: bool = True) -> ResolvedRun:
    init_from, source = None, None
    if cfg.init_from and str(cfg.init_from).strip() and not adopt:
        init_from = resolve_path(cfg.init_from)  # a stored run's: may be gone, checked at use
        if not os.path.exists(init_from) and HUB_ID.match(str(cfg.init_from).strip()):
            source = checkpoint_source(init_from)  # a hub id: its converted copy
            init_from = local_nemo(source)
        elif os.path.isfile(os.path.join(init_from, "config.json")):
            source = checkpoint_source(init_from)
            init_from = local_nemo(source)
    elif cfg.init_from and str(cfg.init_from).strip():
        source, init_from, stored = _init_source(cfg.init_from, weights)
        # the checkpoint defines the architecture; the run chooses how it executes and trains
        chosen = {key: getattr(cfg.model, key) for key in stored.RUN_KEYS}
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(stored, **chosen))
        _check_model_overrides(raw, cfg, overrides)
    size = _world_size(cfg, world if world is not None else World.from_env(default=1))
    check_rules(cfg, size)
    t, p = cfg.trainer, cfg.parallel
    layout = Layout(size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                    p.virtual_pipeline_model_parallel_size, p.sequence_parallel,
                    p.expert_model_parallel_size, p.expert_tensor)
    schedule = Schedule(t.max_steps, t.max_epochs, cfg.optim.warmup_steps, t.global_batch_size,
                        t.micro_batch_size).checked()
    output_dir = cfg.logging.output_dir
    return ResolvedRun(
        config=cfg, layout=layout, schedule=schedule, data_kind=cfg.data.kind,
        sort_group=sort_group_size(cfg, layout.data_parallel), init_from=init_from,
        output_dir=output_dir,
        checkpoint_dir=cfg.checkpoint.dir or os.path.join(output_dir, "checkpoints"),
        reference_cache_dir=(cfg.alignment.reference_cache_dir
                             or os.path.join(output_dir, "reference_cache")),
        init_source=source)


def _init_source(init_from: str, weights: bool) -> tuple[CheckpointSource, Optional[str], Any]:
    """The checkpoint ``init_from`` names, its local .nemo (None: a Hugging Face source read for
    its architecture only) and its architecture. With ``weights`` a Hugging Face source is
    converted (once: ``nemo_aot.conversion.sources.local_nemo``) and the .nemo's config used,
    so a hub id trains exactly as its converted .nemo does."""
    source = checkpoint_source(resolve_path(init_from))
    if source.kind != "nemo" and not weights:
        return source, None, read_architecture(source)
    path = local_nemo(source)
    return source, path, read_nemo_config(path)[0]


def _unset_for_plan(raw: Any) -> Any:
    """``--plan`` reads no data and no weights: data keys the recipe requires and the user left
    unset get ``PLAN_MARKER`` (validation paths: null), an unset ``init_from`` becomes null (the
    recipe's ``model`` is planned), and with neither init_from nor a tokenizer the tokenizer is
    the marker too."""
    import copy

    from omegaconf import OmegaConf

    raw = copy.deepcopy(raw)
    for key in required_keys(raw):
        if key == "init_from":
            OmegaConf.update(raw, key, None)
        elif key.startswith("data."):
            OmegaConf.update(raw, key, None if "validation" in key else PLAN_MARKER)
    if not OmegaConf.select(raw, "init_from") and not OmegaConf.select(raw,
                                                                       "data.tokenizer_path"):
        OmegaConf.update(raw, "data.tokenizer_path", PLAN_MARKER)
    return raw


def _check_model_overrides(raw: Any, cfg: AOTConfig, overrides: Sequence[str]) -> None:
    """Refuse a ``model.<key>=`` override that contradicts the checkpoint's architecture (the
    checkpoint defines the model; the override would be silently dropped)."""
    from omegaconf import OmegaConf

    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if not key.startswith("model.") or "=" not in item or raw is None:
            continue
        if key.split(".")[1] in cfg.model.RUN_KEYS:  # the run's choice, not the checkpoint's
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


def _world_size(cfg: AOTConfig, world: World) -> Optional[int]:
    """The world size to validate against: the launched one, else num_nodes x devices."""
    t = cfg.trainer
    if world.size is None or t.devices is None:
        return world.size if world.size is not None else (
            None if t.devices is None else t.num_nodes * t.devices)
    if world.num_nodes is not None and (t.num_nodes, t.devices) != (world.num_nodes,
                                                                    world.per_node):
        raise ValueError(
            f"trainer.num_nodes x trainer.devices = {t.num_nodes} x {t.devices}, but this job "
            f"runs {_count(world.num_nodes, 'node')} x {_count(world.per_node, 'task')} per "
            f"node: pass trainer.num_nodes={world.num_nodes} trainer.devices={world.per_node} "
            f"(or launch {_count(t.num_nodes, 'node')} x {_count(t.devices, 'task')} per node)")
    if world.size != t.num_nodes * t.devices:
        raise ValueError(
            f"trainer.num_nodes x trainer.devices = {t.num_nodes} x {t.devices} = "
            f"{t.num_nodes * t.devices}, but {world.size} ranks were launched; set "
            "trainer.devices/num_nodes to match the launch (or trainer.devices=null)")
    return world.size


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


__all__ = ["World", "Layout", "Schedule", "ResolvedRun", "resolve_run", "resolve_composed",
           "resolve_config", "resolve_stored", "compose_config"]
