"""``nemo-aot``: align, convert and score Llama-family models with AOT on megatron-core.

    nemo-aot demo                          the embedded default: tiny model, bundled data, CPU
    nemo-aot train recipe=R [KEY=VALUE ...] a recipe + Hydra overrides of conf/gpt_aot.yaml
    nemo-aot convert hf-to-nemo|nemo-to-hf checkpoint conversion
    nemo-aot score --model M.nemo --data F --out scores.jsonl
    nemo-aot launch [--dry-run] -- train ...  SLURM/torchrun-aware launcher (docs/cluster.md)
    nemo-aot --version

Errors a user can fix (bad config, data, checkpoint) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from nemo_aot import __version__
from nemo_aot.algorithms.config import find_config_dir
from nemo_aot.algorithms.export import register as register_export
from nemo_aot.algorithms.memory_plan import format_plan
from nemo_aot.algorithms.resolve import World, resolve_run
from nemo_aot.algorithms.rules import OPTION_RULES, check_option
from nemo_aot.algorithms.run import run_training
from nemo_aot.algorithms.trainer import COMPLETE_REASONS
from nemo_aot.conversion.cli import register as register_convert
from nemo_aot.launcher import register as register_launch
from nemo_aot.progress import configure_logging
from nemo_aot.scoring import register_score

_EPILOG = """\
environment variables (all of them: README.md, "Environment variables"):
  NEMO_AOT_LOG_LEVEL    console level of nemo_aot's own messages (data summary, progress
                        of long phases): DEBUG, INFO (default), WARNING, ERROR; other
                        libraries log at WARNING; ranks other than 0 show WARNING and up
  NEMO_AOT_EXTRACT_DIR  where .nemo files are unpacked (default: the system temp dir)
  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
                        set by torchrun or `nemo-aot launch` (SLURM_* under srun)
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-aot", description="Alignment via Optimal Transport (AOT) for LLMs on NeMo "
        "and megatron-core: DPO plus two sorts, at cluster scale.", epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nemo-aot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="align the embedded tiny model on bundled data (CPU, "
                          "a few minutes) and show where the results are")
    demo.add_argument("--output-dir", default="demo_output", help="where results go "
                      "(default: ./demo_output)")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="Hydra overrides on top of the demo recipe")
    demo.set_defaults(func=_demo)

    train = sub.add_parser(
        "train", help="align a model: a recipe and Hydra overrides of conf/gpt_aot.yaml; run "
        "under torchrun or srun for multi-GPU/multi-node",
        description="Align a model. A recipe is required: recipe=<name>, one of "
        f"{', '.join(_recipes())} (conf/recipe/: base = the schema's defaults on your own "
        "init_from and data, demo = the bundled tiny run). The tokenizer is the one stored in "
        "init_from unless data.tokenizer_path names another with the same vocabulary.")
    train.add_argument("--config-name", default="gpt_aot", help="top-level config (conf/)")
    train.add_argument("--config-dir", default=None, help="a conf/ directory of your own")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit without training")
    train.add_argument("--plan", action="store_true",
                       help="print the per-GPU memory plan of the resolved recipe and layout "
                            "(weights, gradients, optimizer, activations with and without "
                            "recomputation, log-prob workspace) and the largest micro-batch that "
                            "fits, then exit without training")
    train.add_argument("--gpu-memory-gib", type=float, default=80.0,
                       help="GPU memory the plan fits the micro-batch to (default 80: H100)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="e.g. recipe=llama3_8b init_from=/ckpt/llama3_8b.nemo (or a "
                            "Hugging Face folder, or a hub id such as "
                            "meta-llama/Llama-3.1-8B-Instruct) data.train_path=prefs.jsonl")
    train.set_defaults(func=_train)

    register_convert(sub)
    register_score(sub)
    register_export(sub)
    register_launch(sub)
    return parser


def _recipes() -> list:
    try:
        folder = os.path.join(find_config_dir(), "recipe")
    except ValueError:
        return []
    return sorted(n[:-len(".yaml")] for n in os.listdir(folder) if n.endswith(".yaml"))


def _demo(args) -> int:
    overrides = ["recipe=demo", f"logging.output_dir={args.output_dir}", *args.overrides]
    run = resolve_run(overrides)
    cfg = run.config
    print(f"nemo-aot demo: aligning a {cfg.model.num_layers}-layer Llama-style model "
          f"(hidden {cfg.model.hidden_size}) with {cfg.alignment.loss_type} "
          f"(sort scope {cfg.alignment.sort_scope}, beta {cfg.alignment.beta}) on the bundled "
          f"arithmetic preference data, {run.schedule.describe()}, on CPU", flush=True)
    result = run_training(run)
    if result.nemo_path is None:
        return result.exit_code
    print("\nnemo-aot demo: done", f"after {result.final_step} steps ({result.stop_reason})")
    print(f"  aligned policy  {result.nemo_path}")
    if result.adapter_path:
        print(f"  LoRA adapter    {result.adapter_path} (Hugging Face PEFT layout)")
    print(f"  metrics         {result.metrics_path}")
    for plot in result.plots:
        print(f"  plot            {plot}")
    tensorboard = os.path.join(result.output_dir, "tensorboard")
    print(f"  tensorboard     tensorboard --logdir {tensorboard}")
    return 0


def _train(args) -> int:
    # Printing resolves for the planned launch; training for this process's world.
    printing = args.print_config or args.plan
    run = resolve_run(args.overrides, config_name=args.config_name, config_dir=args.config_dir,
                      world=World.planned() if printing else None,
                      purpose="plan" if args.plan else "print" if printing else "train")
    if args.print_config:
        print(run.describe())
        return 0
    if args.plan:
        if run.layout.world_size is None:
            raise ValueError("--plan needs the world size: set trainer.devices (GPUs per node) "
                             "and trainer.num_nodes")
        print(format_plan(run.config, run.layout.world_size, args.gpu_memory_gib))
        return 0
    result = run_training(run)
    if result.nemo_path:
        print(f"nemo-aot train: {result.final_step} steps ({result.stop_reason}); "
              f"policy at {result.nemo_path}")
    elif result.stop_reason not in COMPLETE_REASONS:
        print(f"nemo-aot train: stopped ({result.stop_reason}) at step {result.final_step}; "
              "run the same command again to resume", file=sys.stderr)
    return result.exit_code


# Noise from optional accelerators being absent (CPU hosts) and deprecations inside megatron /
# torch.distributed.checkpoint: true, known, and not actionable by a user of this CLI.
_QUIET = ("Transformer Engine and Apex are not installed", "Apex is not installed",
          "full scope is deprecated", "Please use DTensor instead",
          "`load_state_dict` is deprecated")


def _quiet_known_warnings() -> None:
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=f".*{message}")
    # NeMo's telemetry announces at start-up that it is disabled.
    logging.getLogger("nv_one_logger").setLevel(logging.ERROR)


def _check_numeric_options(args: argparse.Namespace) -> None:
    """Every numeric option the command has, against its one rule (``rules.OPTION_RULES``)."""
    for option in OPTION_RULES:
        attr = option[2:].replace("-", "_")
        if hasattr(args, attr):
            check_option(option, getattr(args, attr))


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_known_warnings()
    try:
        configure_logging()
    except ValueError as err:
        print(f"nemo-aot: error: {err}", file=sys.stderr)
        return 2
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        _check_numeric_options(args)
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"nemo-aot {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before (or after) a run's own handler: nothing to save
        print(f"nemo-aot {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
