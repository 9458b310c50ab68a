"""Launch ``nemo-aot train`` on a cluster: ranks, rendezvous and layout from the environment.

    python -m nemo_aot.launcher [--dry-run] [--status-file FILE] -- train [KEY=VALUE ...]

Every process of the job runs this once (SLURM: ``srun``, one task per GPU; see
scripts/slurm/train_aot.sbatch). The ranks come from, first match wins:

1. torchrun (``TORCHELASTIC_RUN_ID``, or ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` all set): as is.
2. a SLURM job step (srun sets ``SLURM_STEP_NUM_TASKS``): ``SLURM_PROCID``/``SLURM_LOCALID``/
   ``SLURM_NODEID`` -> rank/local rank/node rank; ``MASTER_ADDR`` = first host of the step's node
   list (``scontrol show hostnames``, else our parser: containers lack scontrol);
   ``MASTER_PORT`` = 10000 + job id mod 20000, so tasks agree without talking. Either variable
   already set in the environment wins.
3. neither: one process.

The config is composed and validated at the launched world size (``AOTConfig.validate`` ->
``ParallelConfig.validate``) after the placement rules only a launcher sees (nodes x tasks per
node vs ``trainer.num_nodes`` x ``trainer.devices``, tasks vs GPUs). ``--dry-run`` prints the
layout and the equivalent plain command; otherwise the launcher exports ``RANK``/``WORLD_SIZE``/...
for ``init_distributed`` and trains in this process, so SLURM's signals reach the trainer.
With ``--status-file``, rank 0 records how the run ended (``complete=true`` only for
max_steps/max_epochs); the sbatch script requeues the job when it is false.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Mapping, Optional, Sequence

from nemo_aot.algorithms.resolve import World, resolve_run
from nemo_aot.algorithms.run import run_training
from nemo_aot.algorithms.trainer import COMPLETE_REASONS
from nemo_aot.progress import configure_logging

PORT_BASE, PORT_SPAN = 10000, 20000


# ---------------------------------------------------------------- SLURM list formats
def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names in order: ``node[01-03,07],gpu-a[1-2]`` ->
    node01 node02 node03 node07 gpu-a1 gpu-a2. Zero padding follows the range's first number;
    several bracket groups in one name (``r[1-2]n[1-2]``) expand left to right."""
    return [host for item in _split_top_level(nodelist.strip())
            for host in _expand_name(item, nodelist)]


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in SLURM node list {text!r}")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    items.append(text[start:])
    if any(not item for item in items):
        raise ValueError(f"empty host name in SLURM node list {text!r}")
    return items


def _expand_name(name: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    return [head + value + rest for value in _expand_ranges(match.group(1), whole)
            for rest in _expand_name(tail, whole)]


def _expand_ranges(body: str, whole: str) -> list[str]:
    values = []
    for part in body.split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if found is None:
            raise ValueError(f"bad range {part!r} in SLURM node list {whole!r} "
                             "(expected N or N-M with digits)")
        first, last = found.group(1), found.group(2) or found.group(1)
        if int(last) < int(first):
            raise ValueError(f"descending range {part!r} in SLURM node list {whole!r}")
        values.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return values


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` format -> one count per node: ``8(x2),4`` -> [8, 8, 4]."""
    counts: list[int] = []
    for part in text.strip().split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if found is None:
            raise ValueError(f"cannot parse SLURM tasks per node {text!r}")
        counts.extend([int(found.group(1))] * int(found.group(2) or 1))
    return counts


def resolve_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` when available (the reference), else ``expand_nodelist``
    (inside a container scontrol is usually absent)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)


# ---------------------------------------------------------------- environment -> ranks
@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job."""

    source: str  # "torchrun" | "slurm" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    hosts: tuple = ()
    gpus_on_node: Optional[int] = None
    job_id: Optional[str] = None

    def torch_env(self) -> dict:
        """The variables ``torch.distributed``'s env:// rendezvous and init_distributed read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
                "NODE_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def derive_env(environ: Optional[Mapping[str, str]] = None,
               hostnames: Callable[[str], list] = resolve_hostnames) -> LaunchEnv:
    """This process's ranks from torchrun's or SLURM's variables; ValueError when they are
    missing or contradict each other."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _from_torchrun(env)
    if "SLURM_STEP_NUM_TASKS" in env:
        return _from_slurm(env, hostnames)
    if "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        raise ValueError(
            f"inside SLURM job {env['SLURM_JOB_ID']} ({env['SLURM_NTASKS']} tasks) but not in a "
            "job step: start one task per GPU with srun (see scripts/slurm/train_aot.sbatch), "
            "not from the batch script itself")
    return LaunchEnv("single", 0, 1, 0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                     _int(env, "MASTER_PORT", 29500), gpus_on_node=_gpus(env))


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    rank, world, local = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
    local_world = _int(env, "LOCAL_WORLD_SIZE", world)
    if world % local_world:
        raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}")
    _check_rank("RANK", rank, world)
    _check_rank("LOCAL_RANK", local, local_world)
    return LaunchEnv("torchrun", rank, world, local, local_world,
                     _int(env, "GROUP_RANK", rank // local_world),
                     _int(env, "GROUP_WORLD_SIZE", world // local_world),
                     env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 29500),
                     gpus_on_node=_gpus(env), job_id=env.get("TORCHELASTIC_RUN_ID"))


def _from_slurm(env: Mapping[str, str], hostnames: Callable[[str], list]) -> LaunchEnv:
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    rank, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
    node = _int(env, "SLURM_NODEID")
    nodelist = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    hosts = tuple(hostnames(nodelist))
    per_node_text = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    per_node = expand_tasks_per_node(per_node_text)
    num_nodes = _int(env, "SLURM_STEP_NUM_NODES", len(hosts))
    if not len(hosts) == len(per_node) == num_nodes:
        raise ValueError(f"SLURM step is inconsistent: {num_nodes} nodes, node list {nodelist!r} "
                         f"({len(hosts)} hosts), tasks per node {per_node_text!r}")
    if sum(per_node) != world:
        raise ValueError(f"SLURM tasks per node {per_node_text!r} sum to {sum(per_node)}, "
                         f"but the step has {world} tasks")
    if len(set(per_node)) > 1:
        raise ValueError(f"uneven tasks per node ({per_node_text}): launch the same number of "
                         "tasks on every node (srun --ntasks-per-node=<GPUs per node>)")
    _check_rank("SLURM_PROCID", rank, world)
    _check_rank("SLURM_NODEID", node, num_nodes)
    _check_rank("SLURM_LOCALID", local, per_node[node])
    job_id = env.get("SLURM_JOB_ID")
    default_port = PORT_BASE + int(job_id) % PORT_SPAN if job_id and job_id.isdigit() else 29500
    return LaunchEnv("slurm", rank, world, local, per_node[node], node, num_nodes,
                     env.get("MASTER_ADDR") or hosts[0], _int(env, "MASTER_PORT", default_port),
                     hosts, _gpus(env), job_id)


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def _first(env: Mapping[str, str], *keys: str) -> str:
    for key in keys:
        if env.get(key):
            return env[key]
    raise ValueError(f"none of {', '.join(keys)} is set")


def _check_rank(name: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise ValueError(f"{name}={value} is outside [0, {size})")


def _gpus(env: Mapping[str, str]) -> Optional[int]:
    value = env.get("SLURM_GPUS_ON_NODE", "")
    return int(value) if value.isdigit() else None


# ---------------------------------------------------------------- placement and layout
def check_placement(cfg, launch: LaunchEnv, environ: Optional[Mapping[str, str]] = None) -> list:
    """Placement rules of the GPUs only a launcher sees; returns warnings, raises ValueError on
    errors. The nodes x tasks, world-size and TP/PP/DP rules are the resolution's
    (``resolve_run`` with the launched ``World``)."""
    env = os.environ if environ is None else environ
    warnings = []
    if launch.gpus_on_node is not None and launch.local_world_size > launch.gpus_on_node:
        raise ValueError(f"{launch.local_world_size} tasks per node but {launch.gpus_on_node} "
                         "GPUs per node (SLURM_GPUS_ON_NODE): request --gpus-per-node="
                         f"{launch.local_world_size} or fewer tasks per node")
    if launch.gpus_on_node is not None and launch.local_world_size < launch.gpus_on_node:
        warnings.append(f"{launch.gpus_on_node - launch.local_world_size} GPU(s) per node idle "
                        f"({launch.local_world_size} tasks, {launch.gpus_on_node} GPUs)")
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and launch.local_rank >= len(visible):
        raise ValueError(
            f"local rank {launch.local_rank} but this task sees {len(visible)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}); every task must see all of "
            "the node's GPUs: drop --gpus-per-task/--gpu-bind from srun")
    tp = cfg.parallel.tensor_model_parallel_size
    if launch.num_nodes > 1 and launch.local_world_size % tp:
        warnings.append(f"tensor-parallel groups of {tp} span nodes ({launch.local_world_size} "
                        "ranks per node): TP traffic crosses the network; keep TP <= GPUs per node")
    return warnings


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def rank_coordinates(rank: int, tp: int, pp: int, world_size: int) -> dict:
    """(tp, dp, pp) ranks of ``rank`` in megatron-core's default order tp-cp-ep-dp-pp (cp = ep
    = 1): TP varies fastest, so a TP group is consecutive ranks, i.e. inside one node."""
    dp = world_size // (tp * pp)
    return {"tp": rank % tp, "dp": (rank // tp) % dp, "pp": rank // (tp * dp)}


def expert_groups(world_size: int, etp: int, ep: int, pp: int) -> list[list[int]]:
    """The expert-parallel groups (ranks that exchange tokens) in megatron-core's expert order
    tp-ep-dp-pp over the same ranks as the dense layout: ETP fastest, then EP, then the
    experts' data parallelism, pipeline stages outermost."""
    edp = world_size // (etp * ep * pp)
    return [[t + etp * e + etp * ep * d + etp * ep * edp * s for e in range(ep)]
            for s in range(pp) for d in range(edp) for t in range(etp)]


def _expert_lines(run, launch: LaunchEnv) -> list[str]:
    """The dry-run lines of a mixture-of-experts layout (none for a dense model)."""
    layout, model = run.layout, run.config.model
    if model.num_moe_experts is None:
        return []
    groups = expert_groups(launch.world_size, layout.expert_tensor, layout.expert,
                           layout.pipeline)
    shown = "; ".join(_span(g) for g in groups[:8]) + (
        f"; ... ({len(groups)} groups)" if len(groups) > 8 else "")
    per_node = launch.local_world_size
    crossing = [g for g in groups if g[0] // per_node != g[-1] // per_node]
    lines = [f"  experts      ETP {layout.expert_tensor} x EP {layout.expert} x expert-DP "
             f"{layout.expert_data_parallel} x PP {layout.pipeline}: "
             f"{model.num_moe_experts // layout.expert} of {model.num_moe_experts} experts per "
             f"rank and layer, {model.moe_token_dispatcher_type} dispatcher",
             f"  EP groups    {shown}"]
    if crossing:
        lines.append(f"  warning      {len(crossing)} expert-parallel group(s) span nodes: the "
                     "token exchange crosses the network; keep EP x ETP within a node")
    return lines


def _span(ranks: list[int]) -> str:
    step = ranks[1] - ranks[0] if len(ranks) > 1 else 1
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1, step)):
        return f"[{ranks[0]}-{ranks[-1]}]" if step == 1 else \
            f"[{ranks[0]}-{ranks[-1]} step {step}]"
    return "[" + ",".join(map(str, ranks)) + "]"


def describe(run, launch: LaunchEnv, train_argv: Sequence[str], warnings: Sequence[str]) -> str:
    """The dry-run report of a ``ResolvedRun``: full on rank 0, one line per other rank."""
    cfg, layout = run.config, run.layout
    p, t = cfg.parallel, cfg.trainer
    tp, pp, dp = layout.tensor, layout.pipeline, layout.data_parallel
    coords = rank_coordinates(launch.rank, tp, pp, launch.world_size)
    host = launch.hosts[launch.node_rank] if launch.hosts else "this host"
    where = (f"rank {launch.rank}/{launch.world_size} on node {launch.node_rank} ({host}) local "
             f"{launch.local_rank}: tp {coords['tp']} dp {coords['dp']} pp {coords['pp']}")
    if launch.rank != 0:
        return f"nemo-aot launch (dry run): {where}"
    accumulation = t.global_batch_size // (t.micro_batch_size * dp)
    source = {"slurm": f"SLURM job {launch.job_id}", "torchrun": "torchrun",
              "single": "no launcher (one process)"}[launch.source]
    nodes = ",".join(launch.hosts) if len(launch.hosts) <= 8 else \
        f"{','.join(launch.hosts[:4])},...,{launch.hosts[-1]}"
    env = " ".join(f"{k}={v}" for k, v in launch.torch_env().items())
    command = shlex.join(["python", "-u", "-m", "nemo_aot.cli", *train_argv])
    lines = [
        f"nemo-aot launch (dry run): ranks from {source}",
        f"  nodes        {launch.num_nodes}" + (f" ({nodes})" if nodes else ""),
        f"  ranks        {launch.world_size} = {_count(launch.num_nodes, 'node')} x "
        f"{launch.local_world_size} per node; GPUs per node: {launch.gpus_on_node or 'unknown'}",
        f"  rendezvous   {launch.master_addr}:{launch.master_port}",
        f"  layout       TP {tp} x PP {pp} x DP {dp} = {launch.world_size} (sequence parallel "
        f"{'on' if p.sequence_parallel else 'off'}, virtual pipeline "
        f"{p.virtual_pipeline_model_parallel_size or 'off'}; megatron order tp-cp-ep-dp-pp)",
        *_expert_lines(run, launch),
        f"  this rank    {where}",
        f"  batches      global {t.global_batch_size} = micro {t.micro_batch_size} x DP {dp} x "
        f"{accumulation} accumulation step(s)",
        f"  objective    {cfg.alignment.loss_type}, sort scope {cfg.alignment.sort_scope}",
        f"  checkpoints  {run.checkpoint_dir} (resume {cfg.checkpoint.resume}, save on "
        f"SIGTERM/SIGUSR1 {'on' if cfg.checkpoint.save_on_signal else 'off'})",
        f"  outputs      {cfg.logging.output_dir}",
        *(f"  warning      {w}" for w in warnings),
        f"  command      {env} {command}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- running
def _parse_train_argv(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not argv or argv[0] != "train":
        raise ValueError("the launcher runs training: python -m nemo_aot.launcher [--dry-run] "
                         f"-- train [KEY=VALUE ...] (got {' '.join(argv) or 'nothing'})")
    parser = argparse.ArgumentParser(prog="nemo-aot launch -- train", add_help=False)
    parser.add_argument("--config-name", default="gpt_aot")
    parser.add_argument("--config-dir", default=None)
    parser.add_argument("overrides", nargs="*")
    args, unknown = parser.parse_known_args(argv[1:])
    if unknown:
        raise ValueError(f"unsupported train option(s) {unknown} under the launcher; use "
                         "--config-name, --config-dir and KEY=VALUE overrides")
    args.argv = argv
    return args


def write_status(path: str, stop_reason: str, step: Optional[int], job_id: Optional[str]) -> None:
    """Atomically write ``key=value`` lines the sbatch script greps (no Python needed there)."""
    complete = stop_reason in COMPLETE_REASONS
    text = (f"stop_reason={stop_reason}\nstep={'' if step is None else step}\n"
            f"complete={'true' if complete else 'false'}\njob_id={job_id or ''}\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def launch(args: argparse.Namespace) -> int:
    train = _parse_train_argv(args.train_argv)
    env = derive_env()
    # One resolution at the launched world (nodes x tasks per node first, then every rule at
    # the launched world size), then the GPU placement only a launcher sees.
    run = resolve_run(train.overrides, config_name=train.config_name,
                      config_dir=train.config_dir,
                      world=World(env.world_size, env.num_nodes, env.local_world_size),
                      purpose="print" if args.dry_run else "train")
    warnings = check_placement(run.config, env)
    if args.dry_run:
        print(describe(run, env, train.argv, warnings), flush=True)
        return 0
    if env.rank == 0:
        for warning in warnings:
            print(f"nemo-aot launch: warning: {warning}", file=sys.stderr, flush=True)
    os.environ.update(env.torch_env())
    if args.status_file and env.rank == 0:
        write_status(args.status_file, "running", None, env.job_id)
    result = run_training(run)
    if args.status_file and env.rank == 0:
        write_status(args.status_file, result.stop_reason or "unknown", result.final_step,
                     env.job_id)
    if result.nemo_path:
        print(f"nemo-aot launch: {result.final_step} steps ({result.stop_reason}); "
              f"policy at {result.nemo_path}", flush=True)
    return result.exit_code


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved ranks, rendezvous, TP/PP/DP layout and the "
                             "equivalent command, then exit without training")
    parser.add_argument("--status-file", default=None, metavar="FILE",
                        help="rank 0 writes stop_reason=/step=/complete= lines here when the "
                             "run ends (the sbatch script requeues when complete=false)")
    parser.add_argument("train_argv", nargs=argparse.REMAINDER, metavar="-- train ...",
                        help="-- train [--config-name N] [--config-dir D] [KEY=VALUE ...]")
    parser.set_defaults(func=launch)


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``launch`` to an argparse ``add_subparsers()`` object (``nemo-aot launch``)."""
    parser = subparsers.add_parser(
        "launch", help="train with ranks and layout from SLURM/torchrun variables (one task "
        "per GPU under srun); --dry-run shows the resolved layout",
        description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:  # nemo_aot at INFO (NEMO_AOT_LOG_LEVEL), others at WARNING, INFO from rank 0 only
        configure_logging()
    except ValueError as err:
        print(f"nemo-aot launch: error: {err}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m nemo_aot.launcher",
                                     description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"nemo-aot launch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
