"""``nemo-aot score``: sequence log-probs of every response in a preference file under a .nemo.

Runs the exact code path the trainer uses for reference log-probs (``PolicyRunner.score`` into a
``ReferenceTable``, what the ``cached`` reference policy writes), on CPU or under torchrun with
TP/PP. Output, one JSON line per record:

    paired:   {"index": i, "chosen_logp": ..., "rejected_logp": ..., "chosen_tokens": n,
               "rejected_tokens": m, "location": "file:line"}
    unpaired: {"index": i, "label": true|false, "logp": ..., "tokens": n,
               "location": "file:line"}

Log-probs are summed over response tokens (the label-masked tokens, EOS included when the data
config appends it).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch

from nemo_aot.conversion.sources import checkpoint_source, local_nemo, local_or_hub_folder
from nemo_aot.data import DataConfig, load_preference_data, load_tokenizer, make_batches
from nemo_aot.data.config import resolve_path
from nemo_aot.data.tokenization import check_tokenizer_fits
from nemo_aot.distributed.parallel import ParallelConfig, initialize_model_parallel
from nemo_aot.models.nemo_format import nemo_artifact, open_nemo, read_nemo_config
from nemo_aot.models.options import PrecisionConfig

# megatron and the model modules that import it (models.aot_model, models.reference) imported
# lazily: `nemo-aot --help` registers this command and must not load megatron.


def register_score(subparsers) -> None:
    score = subparsers.add_parser(
        "score", help="per-record response log-probs of a preference file under a .nemo")
    score.add_argument("--model", required=True, metavar="MODEL",
                       help="policy to score with: a .nemo file, an extracted .nemo folder, a "
                            "Hugging Face model folder or a hub id org/name[@revision] "
                            "(converted once and cached)")
    score.add_argument("--data", required=True, metavar="FILE",
                       help="preference data (.jsonl/.json/.parquet or a datasets name)")
    score.add_argument("--negatives", default=None, metavar="FILE",
                       help="negatives file, for two-file unpaired data")
    score.add_argument("--out", required=True, metavar="FILE.jsonl", help="output scores")
    score.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    score.add_argument("--tokenizer", default=None, metavar="DIR|ORG/NAME",
                       help="tokenizer folder or hub id (default: the one inside the .nemo)")
    score.add_argument("--max-seq-length", type=int, default=None,
                       help="longest sequence (default: the model's encoder_seq_length)")
    score.add_argument("--micro-batch-size", type=int, default=4)
    score.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    score.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    score.set_defaults(func=run_score)


@contextlib.contextmanager
def restored_policy(args) -> Iterator[tuple]:
    """``(model, model_cfg, tokenizer_dir)`` of ``args.model`` at ``--tp``/``--pp`` (collective;
    score's and generate's model): a hub id or HF folder converted once, the .nemo extracted once
    per node, ``args.tokenizer`` checked against the stored tokenizer. The tokenizer folder may
    lie inside the extracted .nemo: load it within the block."""
    from nemo_aot.models.aot_model import MegatronGPTAOTModel

    model_path = local_nemo(checkpoint_source(resolve_path(args.model), "--model"), "--model")
    model_cfg, full = read_nemo_config(model_path)
    parallel = ParallelConfig(args.tp, args.pp)
    initialize_model_parallel(parallel, model_cfg)  # first, so the .nemo is extracted per node
    with open_nemo(model_path) as extracted:
        stored_dir = nemo_artifact(extracted, (full.get("tokenizer") or {}).get("type"))
        if args.tokenizer:
            args.tokenizer = local_or_hub_folder(args.tokenizer, "--tokenizer", "tokenizer")
        tokenizer_dir = args.tokenizer or stored_dir
        if tokenizer_dir is None:
            raise ValueError(f"{args.model} carries no tokenizer; pass --tokenizer DIR")
        if args.tokenizer:  # the same check as train's data.tokenizer_path
            check_tokenizer_fits(load_tokenizer(args.tokenizer),
                                 load_tokenizer(stored_dir) if stored_dir else None,
                                 model_cfg.vocab_size, option=f"--tokenizer {args.tokenizer}",
                                 model=args.model, unset="drop --tokenizer")
        precision = PrecisionConfig(precision="bf16" if torch.cuda.is_available() else "fp32")
        model = MegatronGPTAOTModel.restore_from(extracted, precision=precision,
                                                 parallel=parallel)
        yield model, model_cfg, tokenizer_dir


def run_score(args) -> int:
    from nemo_aot.models.reference import score_into_table

    with restored_policy(args) as (model, model_cfg, tokenizer_dir):
        data_cfg = DataConfig(format=args.format, train_path=args.data,
                              train_negatives_path=args.negatives, tokenizer_path=tokenizer_dir,
                              validation_path=None,
                              max_seq_length=args.max_seq_length or model_cfg.encoder_seq_length,
                              shuffle=False)
        tokenizer = load_tokenizer(tokenizer_dir)
        data = load_preference_data(data_cfg, "train", tokenizer, drop_identical=False)
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mbs = args.micro_batch_size
    batches = make_batches(data, data_cfg, mbs * dp_size, mbs, dp_rank, dp_size, train=False)
    sizes = (tuple(len(s) for s in data.streams) if data.kind == "unpaired"
             else (len(data.streams[0]),) * 2)
    table = score_into_table(model, batches, sizes)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _write(args.out, data, table)
        print(f"nemo-aot score: wrote {args.out} ({data.summary.kept} records)")
    return 0


def _write(path: str, data, table) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        if data.kind == "paired":
            for i, ex in enumerate(data.streams[0]):
                f.write(json.dumps({
                    "index": i, "chosen_logp": float(table.logp[0][i]),
                    "rejected_logp": float(table.logp[1][i]),
                    "chosen_tokens": int(table.count[0][i]),
                    "rejected_tokens": int(table.count[1][i]), "location": ex.location}) + "\n")
        else:
            for side, label in ((0, True), (1, False)):
                for i, ex in enumerate(data.streams[side]):
                    f.write(json.dumps({
                        "index": i, "label": label, "logp": float(table.logp[side][i]),
                        "tokens": int(table.count[side][i]), "location": ex.location}) + "\n")
    os.replace(tmp, path)
