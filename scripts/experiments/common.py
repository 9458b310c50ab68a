"""Shared pieces of the AOT-vs-DPO study: the task splits, generation and judging through the
Hugging Face export, and sequence log-probs for held-out rewards.

The task is the bundled arithmetic demo (``nemo_aot.data.demo_task``) restricted to addition and
subtraction of numbers in 0..99: those results can be computed, so a model can get better on
questions it never saw. (Multiplication facts 2..12 x 2..12 are a table of 121 entries that can
only be memorized; held-out multiplication questions would not exist.) Every split holds
distinct expressions, and no expression appears in two splits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager

from nemo_aot.data import demo_task

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

TOKENIZER = "bundled:tokenizer"
TASK_SEED = 20240610
SPLIT_ORDER = ("heldout", "dev", "preference", "sft")
OPERATIONS = "+-"


# Questions reserved per split. Callers take prefixes (a smaller run uses the first N of a
# split), so the splits stay disjoint and a split never depends on how much of another is used.
SPLIT_SIZES = {"heldout": 400, "dev": 200, "preference": 2000, "sft": 8000}


def task_splits(seed: int = TASK_SEED) -> dict:
    """{split: [(question, a, op, b)]}, SPLIT_SIZES questions each, drawn in SPLIT_ORDER from
    one stream; distinct expressions across all splits."""
    rng = random.Random(seed)
    seen, out = set(), {}
    for split in SPLIT_ORDER:
        rows = []
        while len(rows) < SPLIT_SIZES[split]:
            question, a, op, b = demo_task.sample_question(rng)
            if op not in OPERATIONS or (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            rows.append((question, a, op, b))
        out[split] = rows
    return out


def user(text: str) -> list:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: str, records) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with open(path + ".tmp", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    os.replace(path + ".tmp", path)
    return count


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def judge_key(question: str, answer: str) -> tuple:
    """Sort key of an answer under the programmatic judge (larger is better): a correct answer
    beats a wrong one; among wrong ones, a stated result closer to the truth wins; no number
    at all is worst."""
    truth = demo_task.correct_result(question)
    stated = demo_task.extract_answer(answer)
    if stated is None:
        return (0, float("-inf"))
    return (int(stated == truth), -abs(stated - truth))


def win_score(question: str, answer: str, baseline: str) -> float:
    """1 if ``answer`` beats ``baseline`` under the judge, 0.5 on a tie, else 0."""
    a, b = judge_key(question, answer), judge_key(question, baseline)
    return 1.0 if a > b else 0.5 if a == b else 0.0


# ----------------------------------------------------------------------------- HF side


class HFPolicy:
    """A policy as a Hugging Face Llama on the CPU: from a .nemo through the exporter
    (``nemo_to_hf``), or from live megatron-core weights through the same conversion tables."""

    def __init__(self, model):
        from nemo_aot.data import load_tokenizer
        from nemo_aot.data.tokenization import PromptResponseTokenizer

        self.model = model.eval()
        self.tokenizer = load_tokenizer(TOKENIZER)
        self.encoder = PromptResponseTokenizer(self.tokenizer)

    @classmethod
    def from_nemo(cls, nemo_path: str) -> "HFPolicy":
        import torch
        from transformers import AutoModelForCausalLM

        from nemo_aot.conversion.convert import nemo_to_hf

        tmp = tempfile.mkdtemp(prefix="aot_study_hf_")
        try:
            out = os.path.join(tmp, "hf")
            with _quiet():
                nemo_to_hf(nemo_path, out)
            return cls(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_megatron(cls, chunk, model_cfg) -> "HFPolicy":
        """A single-stage, TP=1 megatron GPTModel (DDP-wrapped or not), copied into HF Llama."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from nemo_aot.conversion.architectures import architecture_for_model, hf_config_from_model
        from nemo_aot.conversion.engine import expand, export

        while isinstance(getattr(chunk, "module", None), torch.nn.Module):
            chunk = chunk.module
        arch = architecture_for_model(model_cfg)
        source = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
        tensors = dict(export(expand(arch.mappings(model_cfg), model_cfg.num_layers), source,
                              model_cfg))
        fields = hf_config_from_model(model_cfg, arch, "float32")
        fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type",
                                                             "torch_dtype")}
        model = LlamaForCausalLM(LlamaConfig(**fields))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and
                                              model_cfg.share_embeddings_and_output_weights)]
        assert not missing and not unexpected, (missing, unexpected)
        return cls(model)

    # The exact prompt/response ids training uses (chat template, BOS, EOS): see
    # nemo_aot.data.tokenization.
    def encode(self, questions: list, answers: list = None):
        rendered = [self.encoder.render(user(q), [assistant(a)] if answers else [], "study")
                    for q, a in zip(questions, answers or [None] * len(questions))]
        return self.encoder.encode(rendered)

    def generate(self, questions: list, *, num_samples: int = 1, temperature: float = 0.0,
                 seed: int = 0, max_new_tokens: int = 16, batch_size: int = 256) -> list:
        """[[answer text] * num_samples] per question; temperature 0 = greedy."""
        import torch

        tok = self.tokenizer
        out = []
        for start in range(0, len(questions), batch_size):
            prompts = [p for p, _ in self.encode(questions[start:start + batch_size])]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.encoder.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):  # left padding for generation
                ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
                mask[i, width - len(p):] = 1
            kwargs = dict(do_sample=False) if temperature == 0 else dict(
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                num_return_sequences=num_samples)
            torch.manual_seed(seed + start)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask,
                                          max_new_tokens=max_new_tokens,
                                          eos_token_id=tok.eos_token_id,
                                          pad_token_id=self.encoder.pad_id, **kwargs)
            texts = tok.batch_decode(gen[:, width:], skip_special_tokens=True)
            per = num_samples if temperature else 1
            out.extend(texts[i * per:(i + 1) * per] for i in range(len(prompts)))
        return out

    def sequence_logps(self, questions: list, answers: list, batch_size: int = 256):
        """Summed log pi(answer | question) over the response tokens (EOS included), float64."""
        import torch

        encoded = self.encode(questions, answers)
        result = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            seqs = [list(p) + list(r[0]) for p, r in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.encoder.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            resp = torch.zeros(len(seqs), width, dtype=torch.bool)
            for i, ((p, _), s) in enumerate(zip(chunk, seqs)):
                ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
                mask[i, :len(s)] = 1
                resp[i, len(p):len(s)] = True
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.double()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            result.append((logp * resp[:, 1:]).sum(-1))
        return torch.cat(result)


@contextmanager
def _quiet():
    import logging

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger().setLevel(level)


def greedy_accuracy(policy: HFPolicy, questions: list) -> tuple:
    """(accuracy, answers) of greedy answers on ``questions`` (question texts)."""
    answers = [a[0] for a in policy.generate(questions)]
    scores = [demo_task.score_answer(q, a) for q, a in zip(questions, answers)]
    return sum(scores) / max(len(scores), 1), answers


def quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def comparison_main(doc: str, modes, train_worker, eval_worker, orchestrate, argv=None) -> int:
    """The command line of a comparison built on the study's stages (trl_crosscheck,
    unpaired_shape): ``--mode``, ``--out``, ``--reference``, ``--jobs``; worker processes come
    back through ``--worker train|eval NAMES``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(modes), default="quick")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--reference", default=None,
                        help="a reference .nemo, or 'bundled'; default: SFT one (run_study's "
                             "stage 1)")
    parser.add_argument("--jobs", type=int, default=2, help="concurrent worker processes")
    parser.add_argument("--worker", choices=("train", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        {"train": train_worker, "eval": eval_worker}[args.worker](os.path.abspath(args.out),
                                                                  args.names)
        return 0
    return orchestrate(args)
