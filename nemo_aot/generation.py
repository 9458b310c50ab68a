"""``nemo-aot generate``: completions of prompts under a model, with the forward score runs.

The model is resolved and built as ``nemo-aot score`` builds it (``scoring.restored_policy``: a
.nemo, an extracted .nemo folder, a Hugging Face folder or a hub id, at ``--tp``/``--pp`` under
torchrun), and every new token is one forward of the whole sequence so far through
``PolicyRunner.forward_backward`` (megatron's schedule, forward only): no KV cache, so each token
costs a full recompute - fine for checking a model on CPU or a few prompts, not for serving.
The next token comes from the last position's logits, the final hidden states times the output
weight as the log-probs of score and training compute them, gathered over the TP group.

Prompts are rendered and tokenized by the data package (``PromptResponseTokenizer``): plain text,
or TRL conversational messages through the tokenizer's chat template with the generation prompt
(a record's ``tools`` go to the template too). Greedy by default; ``--temperature`` > 0 samples
(nucleus with ``--top-p``), seeded per prompt by ``--seed`` and the prompt's index, so the
output does not depend on the layout. Generation stops at EOS (kept in the tokens), after
``--max-new-tokens``, or at the model's ``encoder_seq_length``. Output, one JSON line per prompt:

    {"index": i, "prompt": <as given>, "completion": text, "prompt_ids": [...],
     "completion_ids": [...], "finish_reason": "eos" | "max_new_tokens" | "max_length",
     "location": "file:line"}
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import torch

from nemo_aot.data import load_tokenizer
from nemo_aot.data.config import resolve_path
from nemo_aot.data.formats import _text, _tools
from nemo_aot.data.readers import RecordError, iter_rows
from nemo_aot.data.tokenization import PromptResponseTokenizer
from nemo_aot.scoring import restored_policy

ROLES = ["system", "user", "assistant", "tool"]


def register_generate(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="complete prompts with a model (greedy or sampled; CPU or torchrun)",
        description="Complete prompts with a model. Each new token is a full forward of the "
        "sequence so far (no KV cache): meant for checking a model on CPU or a few prompts, not "
        "for serving. Under torchrun, --tp/--pp split the model as in score.")
    gen.add_argument("--model", required=True, metavar="MODEL",
                     help="a .nemo file, an extracted .nemo folder, a Hugging Face model folder "
                          "or a hub id org/name[@revision] (converted once and cached)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE.jsonl",
                        help="one record per line with a 'prompt' field: text, or a list of "
                             "{role, content} messages rendered with the tokenizer's chat "
                             "template (TRL's conversational format; optional 'tools')")
    source.add_argument("--prompt", metavar="TEXT", help="one plain-text prompt")
    gen.add_argument("--out", default=None, metavar="FILE.jsonl",
                     help="output completions (default: stdout)")
    gen.add_argument("--tokenizer", default=None, metavar="DIR|ORG/NAME",
                     help="tokenizer folder or hub id (default: the one stored with the model)")
    gen.add_argument("--max-new-tokens", type=int, default=128,
                     help="most tokens generated per prompt (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy; > 0: sample from softmax(logits / T)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="sampling only: keep the smallest set of tokens whose probability "
                          "reaches this (default 1: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    gen.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    gen.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    gen.set_defaults(func=run_generate)


def read_prompts(args) -> list[tuple[str, object, Optional[tuple]]]:
    """``(location, prompt, tools)`` per prompt, every bad record reported at once."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give it text")
        return [("--prompt", args.prompt, None)]
    path = resolve_path(args.prompts)
    if not os.path.isfile(path):
        raise ValueError(f"--prompts {args.prompts}: file not found. Fix: check the path "
                         f"(relative paths are resolved from {os.getcwd()!r})")
    prompts, errors = [], []
    for location, row in iter_rows(path):
        try:
            if isinstance(row, RecordError):
                raise row
            if "prompt" not in row:
                raise RecordError(location, f"no 'prompt' field (fields: {sorted(row)})",
                                  "give every record a 'prompt': text or a message list")
            prompts.append((location, _text(row["prompt"], "prompt", location, ROLES, False,
                                            "user"), _tools(row.get("tools"), location)))
        except RecordError as err:
            errors.append(str(err))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError(f"--prompts {args.prompts}: {len(errors)} bad record(s){more}:\n  "
                         + "\n  ".join(errors[:5]))
    if not prompts:
        raise ValueError(f"--prompts {args.prompts} holds no records")
    return prompts


def next_token_logits(model, ids: list[int]) -> Optional[torch.Tensor]:
    """[vocab] fp32 logits after ``ids`` on the last pipeline stage (None elsewhere): one
    forward of the whole sequence through the policy's schedule (collective over TP/PP)."""
    from nemo_aot.models.gpt import output_weight
    from nemo_aot.models.logprobs import tp_vocab_range

    runner = model.runner
    tokens = torch.tensor([ids], dtype=torch.long)
    mb = {"input_ids": tokens, "position_ids": torch.arange(len(ids)).unsqueeze(0)}

    def loss_for(index, batch, output):
        last = output[:, -1].float()
        if runner.from_hidden:  # final hidden states: this rank's vocabulary rows of W
            last = last @ output_weight(runner.chunks[-1]).float().t()
        _, group = tp_vocab_range(runner.padded_vocab_size)
        if group is not None:
            parts = [torch.empty_like(last) for _ in range(torch.distributed.get_world_size(group))]
            torch.distributed.all_gather(parts, last.contiguous(), group=group)
            last = torch.cat(parts, -1)
        return last.sum() * 0, {"logits": last[0, :runner.vocab_size].cpu()}

    with model.evaluating():
        stats = runner.forward_backward([mb], loss_for, forward_only=True)
    return stats[0]["logits"] if stats else None


def choose(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator) -> int:
    """Greedy (temperature 0) or a draw from softmax(logits / T) restricted to the top-p set."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass of strictly better tokens
        sorted_probs[before >= top_p] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _from_last_stage(token: Optional[int]) -> int:
    """The token chosen on the last pipeline stage, on every stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return token
    box = [token]
    torch.distributed.broadcast_object_list(
        box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def generate_one(model, prompt_ids: list[int], args, eos_id: Optional[int], max_length: int,
                 seed: int) -> tuple[list[int], str]:
    generator = torch.Generator().manual_seed(seed)
    ids, new = list(prompt_ids), []
    while True:
        if len(new) == args.max_new_tokens:
            return new, "max_new_tokens"
        if len(ids) >= max_length:
            return new, "max_length"
        logits = next_token_logits(model, ids)
        token = _from_last_stage(None if logits is None else
                                 choose(logits, args.temperature, args.top_p, generator))
        ids.append(token)
        new.append(token)
        if token == eos_id:
            return new, "eos"


def run_generate(args) -> int:
    from megatron.core import parallel_state

    prompts = read_prompts(args)  # before the model: a bad file fails in a second
    with restored_policy(args) as (model, model_cfg, tokenizer_dir):
        tokenizer = load_tokenizer(tokenizer_dir)
    renderer = PromptResponseTokenizer(tokenizer, add_eos=False)
    encoded = renderer.encode([renderer.render(prompt, [], location, tools)
                               for location, prompt, tools in prompts])
    max_length = model_cfg.encoder_seq_length
    for (location, _, _), (ids, _) in zip(prompts, encoded):
        if len(ids) >= max_length:
            raise ValueError(f"{location}: the prompt is {len(ids)} tokens, the model's "
                             f"encoder_seq_length is {max_length}: shorten the prompt")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    rows = []
    for i in range(dp_rank, len(prompts), dp_size):  # data-parallel replicas split the prompts
        location, prompt, _ = prompts[i]
        prompt_ids = [int(t) for t in encoded[i][0]]
        new, reason = generate_one(model, prompt_ids, args, renderer.eos_id, max_length,
                                   args.seed + i)
        rows.append({"index": i, "prompt": prompt, "completion": tokenizer.decode(
            new, skip_special_tokens=True), "prompt_ids": prompt_ids, "completion_ids": new,
            "finish_reason": reason, "location": location})
    if dp_size > 1:
        box = [None] * dp_size
        torch.distributed.all_gather_object(box, rows,
                                            group=parallel_state.get_data_parallel_group())
        rows = sorted((r for part in box for r in part), key=lambda r: r["index"])
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        _write(args.out, rows)
    return 0


def _write(path: Optional[str], rows: list[dict]) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if path is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(lines)
    os.replace(tmp, path)
    print(f"nemo-aot generate: wrote {path} ({len(rows)} prompts)", file=sys.stderr)
