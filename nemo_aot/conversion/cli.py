"""``nemo-aot convert``: the conversion subcommands, registered into the main CLI's parser.

    nemo-aot convert hf-to-nemo --hf DIR --out FILE.nemo [--dtype bf16|fp32]
    nemo-aot convert nemo-to-hf --nemo FILE.nemo --out DIR

Each subparser sets ``func`` to a handler taking the parsed namespace and returning an exit
code; user errors (ValueError) are printed as one line and give exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from nemo_aot.conversion.convert import hf_to_nemo, nemo_to_hf
from nemo_aot.conversion.sources import HUB_ID, checkpoint_source, hf_folder


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``convert`` with its two subcommands to an argparse ``add_subparsers()`` object."""
    convert = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face and .nemo",
        description="Convert Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 and Gemma 3 (text) "
                    "checkpoints (nemo_aot.conversion.families) between Hugging "
                    "Face (safetensors) and .nemo (megatron-core dist checkpoint). Runs in one "
                    "process; CPU is fine.")
    sub = convert.add_subparsers(dest="convert_command", metavar="{hf-to-nemo,nemo-to-hf}")
    sub.required = True

    to_nemo = sub.add_parser("hf-to-nemo", help="Hugging Face directory -> .nemo file")
    to_nemo.add_argument("--hf", required=True, metavar="DIR|ORG/NAME",
                         help="Hugging Face checkpoint directory (config.json, *.safetensors, "
                              "tokenizer files) or a hub id org/name[@revision] (through the "
                              "huggingface_hub cache; HF_HUB_OFFLINE=1: the cache only)")
    to_nemo.add_argument("--out", required=True, metavar="FILE.nemo", help="output .nemo file")
    to_nemo.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                         help="weight dtype inside the .nemo (default: bf16)")
    to_nemo.set_defaults(func=run_hf_to_nemo)

    to_hf = sub.add_parser("nemo-to-hf", help=".nemo file -> Hugging Face directory")
    to_hf.add_argument("--nemo", required=True, metavar="FILE", help="input .nemo file")
    to_hf.add_argument("--out", required=True, metavar="DIR",
                       help="output directory (must not exist or be empty)")
    to_hf.set_defaults(func=run_nemo_to_hf)
    return convert


def run_hf_to_nemo(args: argparse.Namespace) -> int:
    def convert():
        hub_id = not os.path.exists(args.hf) and HUB_ID.match(args.hf)
        hf_dir = hf_folder(checkpoint_source(args.hf, "--hf")) if hub_id else args.hf
        hf_to_nemo(hf_dir, args.out, dtype=args.dtype)
    return _report(convert, args.out)


def run_nemo_to_hf(args: argparse.Namespace) -> int:
    return _report(lambda: nemo_to_hf(args.nemo, args.out), args.out)


def _report(action, out: str) -> int:
    try:
        action()
    except ValueError as err:
        print(f"nemo-aot convert: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m nemo_aot.conversion.cli convert ...``)."""
    parser = argparse.ArgumentParser(prog="nemo-aot")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
